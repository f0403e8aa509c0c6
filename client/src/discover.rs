//! Which agent to ask: the one on the failing pod's node, found through the EndpointSlices
//! of the agents' headless Service, whose endpoints carry `nodeName`.

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::ListParams;

use etcd_medic_core::{Code, Error, Result};

/// The base URL (`http(s)://ip:port`) of the ready agent on `node`, from the EndpointSlices
/// of Service `service` in `namespace` (the port named `https`, else `http`).
pub async fn agent_on_node(client: &kube::Client, namespace: &str, service: &str, node: &str) -> Result<String> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), namespace);
    let lp = ListParams::default().labels(&format!("kubernetes.io/service-name={service}"));
    let slices = api
        .list(&lp)
        .await
        .map_err(|e| Error::new(Code::NotReady, format!("cannot list the EndpointSlices of Service {namespace}/{service}: {e}")))?;
    pick(&slices.items, node)
        .ok_or_else(|| Error::new(Code::NotReady, format!("no ready etcd-medic agent on node {node} behind Service {namespace}/{service}")))
}

/// The agent's URL on `node` among `slices`. Pure.
pub fn pick(slices: &[EndpointSlice], node: &str) -> Option<String> {
    for s in slices {
        let port = |name: &str| s.ports.iter().flatten().find(|p| p.name.as_deref() == Some(name)).and_then(|p| p.port);
        let (scheme, port) = match (port("https"), port("http")) {
            (Some(p), _) => ("https", p),
            (None, Some(p)) => ("http", p),
            _ => continue,
        };
        let ready = |e: &k8s_openapi::api::discovery::v1::Endpoint| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
        if let Some(e) = s.endpoints.iter().find(|e| e.node_name.as_deref() == Some(node) && ready(e))
            && let Some(addr) = e.addresses.first()
        {
            let host = if s.address_type == "IPv6" { format!("[{addr}]") } else { addr.clone() };
            return Some(format!("{scheme}://{host}:{port}"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_ready_agent_of_the_node_by_its_named_port() {
        let s = slice(serde_json::json!({
            "metadata": {"name": "etcd-medic-abc", "labels": {"kubernetes.io/service-name": "etcd-medic"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 9464}],
            "endpoints": [
                {"addresses": ["10.0.0.7"], "nodeName": "node-a", "conditions": {"ready": true}},
                {"addresses": ["10.0.1.7"], "nodeName": "node-b", "conditions": {"ready": false}},
                {"addresses": ["10.0.2.7"], "nodeName": "node-c"},
            ],
        }));
        assert_eq!(pick(std::slice::from_ref(&s), "node-a").as_deref(), Some("http://10.0.0.7:9464"));
        assert_eq!(pick(std::slice::from_ref(&s), "node-b"), None, "not ready");
        assert_eq!(pick(std::slice::from_ref(&s), "node-c").as_deref(), Some("http://10.0.2.7:9464"), "ready when unknown");
        assert_eq!(pick(&[s], "node-z"), None);
        let v6 = slice(serde_json::json!({
            "metadata": {"name": "x"}, "addressType": "IPv6", "ports": [{"name": "https", "port": 9464}],
            "endpoints": [{"addresses": ["fd00::7"], "nodeName": "node-a"}],
        }));
        assert_eq!(pick(&[v6], "node-a").as_deref(), Some("https://[fd00::7]:9464"));
    }
}

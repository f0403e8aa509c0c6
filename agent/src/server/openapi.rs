//! `/openapi.json`, generated from the handlers' annotations and the types they exchange.
//! The committed copy (`agent/openapi.json`) is checked against it by a unit test, so the
//! published contract cannot drift from the code.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "etcd-medic agent",
        version = "v1",
        description = "The node-local API of etcd-medic: remediate an etcd member stuck in `etcdserver: member not found`. Errors are application/problem+json with a stable `code`."
    ),
    paths(
        super::routes::create,
        super::routes::list,
        super::routes::show,
        super::routes::restore,
        super::routes::recovery_step,
        super::routes::healthz,
        super::routes::readyz,
        super::routes::metrics_text,
        super::routes::openapi_json
    ),
    modifiers(&Bearer)
)]
pub struct ApiDoc;

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A Kubernetes token (TokenReview), allowed create/get on remediations.etcd-medic.io (SubjectAccessReview)",
                    ))
                    .build(),
            ),
        );
    }
}

pub fn document() -> String {
    ApiDoc::openapi().to_pretty_json().expect("the document serializes") + "\n"
}

#[cfg(test)]
mod tests {
    /// Regenerate with `ETCD_MEDIC_UPDATE_OPENAPI=1 cargo test -p etcd-medic openapi`.
    #[test]
    fn the_committed_openapi_json_is_the_generated_one() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
        let generated = super::document();
        if std::env::var_os("ETCD_MEDIC_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(committed == generated, "agent/openapi.json is stale: run ETCD_MEDIC_UPDATE_OPENAPI=1 cargo test -p etcd-medic openapi");
    }
}

//! Kubernetes API calls that survive blips: a transient failure (429, 500, 502, 503, 504,
//! no answer in time, a broken connection) is asked again with exponential back-off,
//! honouring the server's `Retry-After` (`details.retryAfterSeconds` of its `Status`), for a
//! bounded time. Shared by the agent, the controller and the kubectl plugin.

use std::time::Duration;

/// What one failed attempt means.
#[derive(Debug, PartialEq, Eq)]
pub enum Attempt {
    /// Worth asking again, after at least this long (the server's `Retry-After`), if given.
    Transient(Option<Duration>),
    /// An answer: asking again would get the same.
    Final,
}

/// Whether an attempt's failure is a blip. Pure.
pub fn classify(e: &kube::Error) -> Attempt {
    match e {
        kube::Error::Api(s) if matches!(s.code, 429 | 500 | 502 | 503 | 504) => {
            let after = s.details.as_ref().map(|d| d.retry_after_seconds).filter(|s| *s > 0).map(|s| Duration::from_secs(s as u64));
            Attempt::Transient(after)
        }
        kube::Error::Api(_) => Attempt::Final,
        // No answer, a reset connection, a body cut short: the request may be retried.
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) | kube::Error::HttpError(_) => {
            Attempt::Transient(None)
        }
        _ => Attempt::Final,
    }
}

/// The next wait: the server's `Retry-After` (at most 30 s) or the back-off, doubling to 2 s.
pub fn next_wait(backoff: &mut Duration, retry_after: Option<Duration>) -> Duration {
    let wait = retry_after.map(|a| a.min(Duration::from_secs(30))).unwrap_or(*backoff);
    *backoff = (*backoff * 2).min(Duration::from_secs(2));
    wait
}

/// `op` until it answers, each attempt bounded by `timeout`, transient failures asked again
/// for `retry_for`: `Err((None, n))` when the last of `n` attempts got no answer in time,
/// `Err((Some(e), n))` with the last error otherwise.
pub async fn retrying<T, F, Fut>(timeout: Duration, retry_for: Duration, what: &str, op: &mut F) -> Result<T, (Option<kube::Error>, u32)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = kube::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + retry_for;
    let mut backoff = Duration::from_millis(100);
    let mut tries = 0;
    loop {
        tries += 1;
        let (err, after) = match tokio::time::timeout(timeout, op()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => match classify(&e) {
                Attempt::Final => return Err((Some(e), tries)),
                Attempt::Transient(after) => (Some(e), after),
            },
            Err(_) => (None, None),
        };
        let wait = next_wait(&mut backoff, after);
        if tokio::time::Instant::now() + wait > deadline {
            return Err((err, tries));
        }
        tracing::debug!(tries, "transient failure of the API server for {what}; again in {wait:?}");
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, retry_after: u32) -> kube::Error {
        let mut s = kube::core::Status::failure("x", "y");
        s.code = code;
        if retry_after > 0 {
            s.details = Some(serde_json::from_value(serde_json::json!({"retryAfterSeconds": retry_after})).unwrap());
        }
        kube::Error::Api(Box::new(s))
    }

    #[test]
    fn blips_are_retried_answers_are_not() {
        for code in [429, 500, 502, 503, 504] {
            assert!(matches!(classify(&status(code, 0)), Attempt::Transient(None)), "{code}");
        }
        for code in [400, 401, 403, 404, 409, 422] {
            assert_eq!(classify(&status(code, 0)), Attempt::Final, "{code}");
        }
        assert_eq!(classify(&status(429, 3)), Attempt::Transient(Some(Duration::from_secs(3))));
    }

    #[test]
    fn back_off_doubles_to_two_seconds_and_retry_after_wins() {
        let mut b = Duration::from_millis(100);
        let waits: Vec<_> = (0..7).map(|_| next_wait(&mut b, None)).collect();
        assert_eq!(waits[0], Duration::from_millis(100));
        assert_eq!(waits[4], Duration::from_millis(1600));
        assert_eq!(waits[6], Duration::from_secs(2));
        assert_eq!(next_wait(&mut b, Some(Duration::from_secs(7))), Duration::from_secs(7));
        assert_eq!(next_wait(&mut b, Some(Duration::from_secs(600))), Duration::from_secs(30));
    }
}

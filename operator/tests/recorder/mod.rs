//! A kube `Client` that records every request (verb, API group, resource) before passing it on,
//! so tests can hold the operator's RBAC rules against what its code really asks the API server.

use std::sync::{Arc, Mutex};

use kube::{client::Body, Client};

/// One API request, as RBAC sees it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Access {
    pub verb: String,
    pub group: String,
    pub resource: String,
}

#[derive(Clone, Default)]
pub struct Recorder(Arc<Mutex<Vec<Access>>>, Arc<Mutex<Vec<String>>>);

/// `/api/v1/namespaces/ns/secrets/name` or `/apis/apps/v1/namespaces/ns/deployments/name/status` → RBAC terms.
fn access(method: &http::Method, path: &str, query: &str) -> Access {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => panic!("not an API path: {path}"),
    };
    let rest = match rest {
        ["namespaces", _ns, rest @ ..] if !rest.is_empty() => rest,
        rest => rest,
    };
    let (resource, name) = match rest {
        [resource] => (resource.to_string(), None),
        [resource, name] => (resource.to_string(), Some(*name)),
        [resource, name, sub] => (format!("{resource}/{sub}"), Some(*name)),
        _ => panic!("unexpected API path: {path}"),
    };
    let verb = match (method.as_str(), name) {
        ("GET", Some(_)) => "get",
        ("GET", None) if query.contains("watch=true") => "watch",
        ("GET", None) => "list",
        ("POST", _) => "create",
        ("PATCH", _) => "patch",
        ("PUT", _) => "update",
        ("DELETE", Some(_)) => "delete",
        ("DELETE", None) => "deletecollection",
        (other, _) => panic!("unexpected method {other}"),
    };
    Access { verb: verb.into(), group: group.into(), resource }
}

impl Recorder {
    /// A client that records each request and forwards it to `inner`.
    pub fn wrap(&self, inner: Client) -> Client {
        let (log, paths) = (self.0.clone(), self.1.clone());
        let service = tower::service_fn(move |request: http::Request<Body>| {
            let (inner, log, paths) = (inner.clone(), log.clone(), paths.clone());
            async move {
                let uri = request.uri().clone();
                log.lock().unwrap().push(access(request.method(), uri.path(), uri.query().unwrap_or_default()));
                paths.lock().unwrap().push(format!("{} {}", request.method(), uri));
                inner.send(request).await
            }
        });
        Client::new(service, "default")
    }

    /// Every distinct request made so far.
    pub fn accesses(&self) -> Vec<Access> {
        let mut all = self.0.lock().unwrap().clone();
        all.sort();
        all.dedup();
        all
    }

    /// Every request made so far, as `METHOD /path?query`, in order.
    #[allow(dead_code)]
    pub fn requests(&self) -> Vec<String> {
        self.1.lock().unwrap().clone()
    }
}

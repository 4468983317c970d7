//! Who a client is, and what it may do: bearer JWTs checked against an HS256 secret or an OpenID
//! Connect issuer's keys ([`keys`]), groups that allow reading and sending, and the abuse limits
//! ([`limits`]).
//!
//! The transports find the token ([`token_of_header`], [`token_of_payload`]), [`Auth::authenticate`]
//! turns it into an [`Identity`], and every request carries a [`Caller`] to the resolvers. With
//! `--auth none` every caller is anonymous and may do everything.

pub mod keys;
pub mod limits;

use std::{
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_graphql::ErrorExtensions;
use serde_json::Value;

pub use keys::Verifier;

/// A signed-in user, from a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's `sub`: who sends, however the display name changes.
    pub sub: String,
    /// The display name messages are sent under.
    pub name: String,
    pub groups: Vec<String>,
    /// When the token stops being valid: a socket signed in with it closes then (4401).
    pub expires_at: SystemTime,
}

/// Who makes a request: the signed-in user, if any, and the client's address.
#[derive(Debug, Clone)]
pub struct Caller {
    pub identity: Option<Arc<Identity>>,
    pub ip: IpAddr,
}

impl Caller {
    pub fn anonymous(ip: IpAddr) -> Self {
        Self { identity: None, ip }
    }
}

/// Why a client was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token where one is needed, or one that does not verify: HTTP 401, close 4401.
    #[error("{0}")]
    Unauthenticated(String),
    /// A valid token whose groups do not allow the action: HTTP 403, close 4403.
    #[error("{0}")]
    Forbidden(String),
}

impl AuthError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthenticated(_) => "UNAUTHENTICATED",
            Self::Forbidden(_) => "FORBIDDEN",
        }
    }

    /// The WebSocket close code.
    pub fn close_code(&self) -> u16 {
        match self {
            Self::Unauthenticated(_) => 4401,
            Self::Forbidden(_) => 4403,
        }
    }

    pub fn graphql(&self) -> async_graphql::Error {
        let code = self.code();
        async_graphql::Error::new(self.to_string()).extend_with(|_, e| e.set("code", code))
    }
}

/// Which claims hold what, and the groups that allow reading and sending.
#[derive(Debug, Clone)]
pub struct Policy {
    pub groups_claim: String,
    pub name_claim: String,
    /// Empty: any signed-in user may read.
    pub read_groups: Vec<String>,
    /// Empty: any user who may read may send.
    pub send_groups: Vec<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            groups_claim: "groups".into(),
            name_claim: "name".into(),
            read_groups: Vec::new(),
            send_groups: Vec::new(),
        }
    }
}

/// Sign-in for the gateway: off, or a verifier and the policy its identities are held to.
pub struct Auth {
    verifier: Option<Verifier>,
    policy: Policy,
}

impl Auth {
    /// Everyone may do everything, anonymously.
    pub fn off() -> Self {
        Self { verifier: None, policy: Policy::default() }
    }

    pub fn new(verifier: Verifier, policy: Policy) -> Self {
        Self { verifier: Some(verifier), policy }
    }

    pub fn enabled(&self) -> bool {
        self.verifier.is_some()
    }

    /// Fetches an OpenID issuer's keys once at start, saying loudly when that fails (every sign-in
    /// would be refused until it works).
    pub async fn prefetch(&self) {
        if let Some(Verifier::Issuer(keys)) = &self.verifier {
            if keys.prefetch().await {
                tracing::info!("the issuer's signing keys are fetched: sign-in works");
            }
        }
    }

    /// The caller behind `token` (a bearer token without its scheme), allowed to read. With auth
    /// off, anyone is, anonymously (a token is then ignored).
    pub async fn authenticate(&self, token: Option<&str>) -> Result<Option<Arc<Identity>>, AuthError> {
        let Some(verifier) = &self.verifier else {
            return Ok(None);
        };
        let token = token.filter(|t| !t.is_empty()).ok_or_else(|| {
            AuthError::Unauthenticated("sign-in required: send a bearer token (Authorization: Bearer …)".into())
        })?;
        let claims = verifier.verify(token).await.map_err(|reason| {
            tracing::debug!(%reason, "a token was refused");
            AuthError::Unauthenticated(format!("invalid token: {reason}"))
        })?;
        let identity = self.identity(&claims)?;
        if !member(&identity, &self.policy.read_groups) {
            return Err(AuthError::Forbidden(format!(
                "reading needs membership of one of the groups [{}]",
                self.policy.read_groups.join(", ")
            )));
        }
        Ok(Some(Arc::new(identity)))
    }

    fn identity(&self, claims: &Value) -> Result<Identity, AuthError> {
        let invalid = |reason: &str| AuthError::Unauthenticated(format!("invalid token: {reason}"));
        let sub =
            claims.get("sub").and_then(Value::as_str).filter(|s| !s.is_empty()).ok_or_else(|| invalid("no sub"))?;
        let exp = claims.get("exp").and_then(Value::as_u64).ok_or_else(|| invalid("no exp"))?;
        let name = [self.policy.name_claim.as_str(), "preferred_username"]
            .into_iter()
            .find_map(|claim| claim_at(claims, claim).and_then(Value::as_str).filter(|n| !n.is_empty()))
            .unwrap_or(sub);
        let groups = match claim_at(claims, &self.policy.groups_claim) {
            Some(Value::Array(groups)) => groups.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
            // Some providers send one group as a string, or several separated by spaces.
            Some(Value::String(groups)) => {
                groups.split([' ', ',']).filter(|g| !g.is_empty()).map(str::to_owned).collect()
            }
            _ => Vec::new(),
        };
        Ok(Identity {
            sub: sub.to_owned(),
            name: name.to_owned(),
            groups,
            expires_at: UNIX_EPOCH + Duration::from_secs(exp),
        })
    }

    /// Whether `caller` may send. Anonymous callers may only when auth is off.
    pub fn may_send(&self, caller: Option<&Caller>) -> Result<(), AuthError> {
        if !self.enabled() {
            return Ok(());
        }
        let identity = caller
            .and_then(|c| c.identity.as_deref())
            .ok_or_else(|| AuthError::Unauthenticated("sign-in required to send".into()))?;
        if member(identity, &self.policy.send_groups) {
            Ok(())
        } else {
            Err(AuthError::Forbidden(format!(
                "sending needs membership of one of the groups [{}]",
                self.policy.send_groups.join(", ")
            )))
        }
    }
}

/// Whether `identity` is in one of `groups` (any identity, for no groups).
fn member(identity: &Identity, groups: &[String]) -> bool {
    groups.is_empty() || identity.groups.iter().any(|g| groups.contains(g))
}

/// A claim by its name, or by a dotted path into nested objects when no claim has the whole name
/// (Keycloak's `realm_access.roles`; Cognito's `cognito:groups` is one name).
fn claim_at<'a>(claims: &'a Value, name: &str) -> Option<&'a Value> {
    claims.get(name).or_else(|| name.split('.').try_fold(claims, |value, part| value.get(part)))
}

/// The token of an `Authorization: Bearer …` value; the scheme is matched without regard to case.
pub fn token_of_header(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The token of a `connection_init` payload (or a plain socket's first frame):
/// `{"authorization": "Bearer …"}` (any case of the key, with or without the scheme), or the
/// `{"token": …}` / `{"authToken": …}` shapes clients send from Apollo Client's `connectionParams`.
pub fn token_of_payload(payload: &Value) -> Option<&str> {
    let object = payload.as_object()?;
    let value = object.iter().find_map(|(key, value)| {
        ["authorization", "token", "authtoken", "accesstoken"]
            .iter()
            .any(|k| key.eq_ignore_ascii_case(k))
            .then_some(value)
    })?;
    let value = value.as_str()?;
    Some(token_of_header(value).unwrap_or(value.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn auth(policy: Policy) -> Auth {
        Auth::new(Verifier::hs256(b"0123456789abcdef0123456789abcdef", None, None, Duration::ZERO), policy)
    }

    #[test]
    fn tokens_are_found_in_headers_and_init_payloads() {
        assert_eq!(token_of_header("Bearer abc"), Some("abc"));
        assert_eq!(token_of_header("bearer  abc "), Some("abc"));
        assert_eq!(token_of_header("Basic abc"), None);
        assert_eq!(token_of_payload(&json!({"authorization": "Bearer abc"})), Some("abc"));
        assert_eq!(token_of_payload(&json!({"Authorization": "Bearer abc"})), Some("abc"));
        assert_eq!(token_of_payload(&json!({"token": "abc"})), Some("abc"));
        assert_eq!(token_of_payload(&json!({"authToken": "Bearer abc"})), Some("abc"));
        assert_eq!(token_of_payload(&json!({"other": "abc"})), None);
        assert_eq!(token_of_payload(&json!("abc")), None);
    }

    #[test]
    fn the_identity_takes_its_name_and_groups_from_the_configured_claims() {
        let policy =
            Policy { groups_claim: "cognito:groups".into(), name_claim: "nickname".into(), ..Policy::default() };
        let claims = json!({"sub": "u1", "exp": 2_000_000_000u64, "nickname": "Ana", "cognito:groups": ["a", "b"]});
        let identity = auth(policy).identity(&claims).unwrap();
        assert_eq!((identity.sub.as_str(), identity.name.as_str()), ("u1", "Ana"));
        assert_eq!(identity.groups, vec!["a", "b"]);

        let policy = Policy { groups_claim: "realm_access.roles".into(), ..Policy::default() };
        let claims =
            json!({"sub": "u2", "exp": 2_000_000_000u64, "preferred_username": "bo", "realm_access": {"roles": ["x"]}});
        let identity = auth(policy).identity(&claims).unwrap();
        assert_eq!((identity.name.as_str(), identity.groups.clone()), ("bo", vec!["x".to_owned()]));

        let claims = json!({"sub": "u3", "exp": 2_000_000_000u64});
        assert_eq!(auth(Policy::default()).identity(&claims).unwrap().name, "u3", "the name falls back to sub");
        assert!(auth(Policy::default()).identity(&json!({"exp": 1})).is_err(), "no sub");
    }

    #[test]
    fn sending_needs_a_send_group_and_a_signed_in_caller() {
        let policy = Policy { send_groups: vec!["senders".into()], ..Policy::default() };
        let auth = auth(policy);
        let caller = |groups: &[&str]| Caller {
            identity: Some(Arc::new(Identity {
                sub: "u".into(),
                name: "u".into(),
                groups: groups.iter().map(|g| g.to_string()).collect(),
                expires_at: SystemTime::now(),
            })),
            ip: IpAddr::from([127, 0, 0, 1]),
        };
        assert!(auth.may_send(Some(&caller(&["senders"]))).is_ok());
        assert_eq!(auth.may_send(Some(&caller(&["readers"]))).unwrap_err().code(), "FORBIDDEN");
        assert_eq!(auth.may_send(None).unwrap_err().code(), "UNAUTHENTICATED");
        assert!(Auth::off().may_send(None).is_ok());
    }
}

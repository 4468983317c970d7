//! Verifying bearer JWTs: with a shared HS256 secret, or with the keys an OpenID Connect issuer
//! publishes (its discovery document names the JWKS). Issuer keys are cached and fetched again when
//! a token names a key id the cache lacks, so a key rotation needs no restart.
//!
//! Each key verifies only the algorithm it is for (the JWK's `alg`, else the one its type implies),
//! so neither `alg: none` nor an HS256 token signed with an RSA public key passes.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use jsonwebtoken::{
    jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse},
    Algorithm, DecodingKey, Validation,
};
use serde_json::Value;

/// How long fetched keys are used before they are fetched again.
const KEYS_TTL: Duration = Duration::from_secs(600);
/// The least time between two fetches: a token naming an unknown key id waits for the next one (and
/// shares it with every token that waited meanwhile), so made-up key ids cannot turn the gateway into
/// a load on the issuer.
const REFETCH_INTERVAL: Duration = Duration::from_secs(1);
/// How long one request to the issuer may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a sign-in waits for the issuer's keys before it is refused.
const KEY_WAIT: Duration = Duration::from_secs(8);

/// When the keys were last fetched for, and whether that worked.
#[derive(Clone, Copy)]
struct Attempt {
    at: Instant,
    succeeded: bool,
}

/// Checks tokens and returns their claims.
pub enum Verifier {
    Secret { key: DecodingKey, validation: Box<Validation> },
    Issuer(Arc<IssuerKeys>),
}

fn validation(algorithm: Algorithm, issuer: Option<&str>, audience: Option<&str>, leeway: Duration) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.leeway = leeway.as_secs();
    validation.validate_nbf = true;
    // A claim jsonwebtoken checks is only checked when present: each one configured is required.
    let mut required = vec!["exp", "sub"];
    required.extend(issuer.map(|_| "iss"));
    required.extend(audience.map(|_| "aud"));
    validation.set_required_spec_claims(&required);
    if let Some(issuer) = issuer {
        validation.set_issuer(&[issuer]);
    }
    match audience {
        Some(audience) => validation.set_audience(&[audience]),
        None => validation.validate_aud = false,
    }
    validation
}

fn describe(err: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match err.kind() {
        K::InvalidSignature => "the signature does not verify".into(),
        K::ExpiredSignature => "the token has expired".into(),
        K::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        K::InvalidIssuer => "the issuer (iss) is not the one this gateway trusts".into(),
        K::InvalidAudience => "the audience (aud) does not name this gateway".into(),
        K::InvalidAlgorithm => "the algorithm is not the one of the signing key".into(),
        K::MissingRequiredClaim(claim) => format!("the {claim} claim is missing"),
        K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => "the token is not a well-formed JWT".into(),
        other => format!("{other:?}"),
    }
}

impl Verifier {
    /// Tokens signed HS256 with `secret`.
    pub fn hs256(secret: &[u8], issuer: Option<&str>, audience: Option<&str>, leeway: Duration) -> Self {
        Self::Secret {
            key: DecodingKey::from_secret(secret),
            validation: Box::new(validation(Algorithm::HS256, issuer, audience, leeway)),
        }
    }

    /// Tokens of the OpenID Connect `issuer` for `audience`.
    pub fn issuer(issuer: &str, audience: &str, leeway: Duration) -> anyhow::Result<Self> {
        Ok(Self::Issuer(Arc::new(IssuerKeys::new(issuer, audience, leeway)?)))
    }

    /// The token's claims, once its signature, algorithm, times, issuer and audience hold.
    pub async fn verify(&self, token: &str) -> Result<Value, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::Json(_) => "the header names no algorithm this gateway accepts".into(),
            _ => describe(&e),
        })?;
        match self {
            Self::Secret { key, validation } => decode(token, key, validation),
            Self::Issuer(keys) => {
                let key = keys.key(header.kid.as_deref()).await?;
                decode(token, &key.key, &key.validation)
            }
        }
    }
}

fn decode(token: &str, key: &DecodingKey, validation: &Validation) -> Result<Value, String> {
    jsonwebtoken::decode::<Value>(token, key, validation).map(|data| data.claims).map_err(|e| describe(&e))
}

/// One of the issuer's keys, with the checks a token signed by it must pass.
pub struct IssuerKey {
    key: DecodingKey,
    validation: Validation,
}

struct Fetched {
    /// By key id; a key without one is under "".
    keys: HashMap<String, Arc<IssuerKey>>,
    at: Instant,
}

/// The issuer's keys, fetched through its discovery document.
pub struct IssuerKeys {
    issuer: String,
    audience: String,
    leeway: Duration,
    client: reqwest_tls::Client,
    fetched: RwLock<Option<Arc<Fetched>>>,
    attempted: std::sync::Mutex<Option<Attempt>>,
    /// One fetch at a time; holds the JWKS URL once discovered.
    fetching: tokio::sync::Mutex<Option<String>>,
}

impl IssuerKeys {
    fn new(issuer: &str, audience: &str, leeway: Duration) -> anyhow::Result<Self> {
        let url = reqwest_tls::Url::parse(issuer).map_err(|e| anyhow::anyhow!("invalid issuer URL {issuer:?}: {e}"))?;
        anyhow::ensure!(matches!(url.scheme(), "http" | "https"), "the issuer {issuer:?} is not an http(s) URL");
        let client = reqwest_tls::Client::builder().timeout(FETCH_TIMEOUT).build()?;
        Ok(Self {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            leeway,
            client,
            fetched: RwLock::new(None),
            attempted: std::sync::Mutex::new(None),
            fetching: tokio::sync::Mutex::new(None),
        })
    }

    fn cached(&self) -> Option<Arc<Fetched>> {
        self.fetched.read().expect("keys lock").clone()
    }

    /// The key `kid` names (the only key, for a token without `kid`). Keys past their time are used
    /// while a refresh runs behind; a key id the keys lack waits for the next fetch (or the one in
    /// flight), at most one a second whether fetches succeed or fail, and never longer than
    /// [`KEY_WAIT`].
    async fn key(self: &Arc<Self>, kid: Option<&str>) -> Result<Arc<IssuerKey>, String> {
        let find = |fetched: &Fetched| match kid {
            Some(kid) => fetched.keys.get(kid).cloned(),
            None if fetched.keys.len() == 1 => fetched.keys.values().next().cloned(),
            None => fetched.keys.get("").cloned(),
        };
        if let Some(fetched) = self.cached() {
            if let Some(key) = find(&fetched) {
                if fetched.at.elapsed() >= KEYS_TTL {
                    self.refresh_behind();
                }
                return Ok(key);
            }
        }
        let asked = Instant::now();
        let unavailable = || "the issuer's signing keys cannot be fetched right now; try again shortly".to_owned();
        let refreshed = tokio::time::timeout(KEY_WAIT, async {
            let mut jwks_uri = self.fetching.lock().await;
            let last = *self.attempted.lock().expect("attempt lock");
            match last {
                // An attempt began while this caller waited: its outcome is as new as any.
                Some(last) if last.at >= asked => last.succeeded,
                _ => {
                    if let Some(last) = last {
                        tokio::time::sleep(REFETCH_INTERVAL.saturating_sub(last.at.elapsed())).await;
                    }
                    self.attempt(&mut jwks_uri).await
                }
            }
        })
        .await;
        match refreshed {
            Ok(true) => {}
            Ok(false) | Err(_) => return Err(unavailable()),
        }
        let fetched = self.cached().ok_or_else(unavailable)?;
        find(&fetched).ok_or_else(|| match kid {
            Some(kid) => format!("no signing key of the issuer has the key id {kid:?}"),
            None => "the token names no key id (kid) and the issuer has several keys".into(),
        })
    }

    /// One fetch, recorded (when it began, and whether it worked) for the callers waiting on it.
    async fn attempt(&self, jwks_uri: &mut Option<String>) -> bool {
        let at = Instant::now();
        let succeeded = match self.fetch(jwks_uri).await {
            Ok(_) => true,
            Err(err) => {
                tracing::error!(issuer = %self.issuer, error = %err, "fetching the issuer's signing keys failed: \
                    tokens signed with keys not fetched before are refused");
                false
            }
        };
        *self.attempted.lock().expect("attempt lock") = Some(Attempt { at, succeeded });
        succeeded
    }

    /// Fetches the keys again in a task of its own, unless a fetch is under way.
    fn refresh_behind(self: &Arc<Self>) {
        let keys = self.clone();
        tokio::spawn(async move {
            if let Ok(mut jwks_uri) = keys.fetching.try_lock() {
                let recent =
                    keys.attempted.lock().expect("attempt lock").is_some_and(|a| a.at.elapsed() < REFETCH_INTERVAL);
                if !recent {
                    keys.attempt(&mut jwks_uri).await;
                }
            }
        });
    }

    /// Fetches the keys once now, so that a misconfigured or unreachable issuer shows in the log at
    /// start rather than at the first sign-in.
    pub async fn prefetch(self: &Arc<Self>) -> bool {
        let mut jwks_uri = self.fetching.lock().await;
        self.attempt(&mut jwks_uri).await
    }

    async fn get_json(&self, url: &str) -> anyhow::Result<Value> {
        let response = self.client.get(url).send().await?.error_for_status()?;
        Ok(serde_json::from_slice(&response.bytes().await?)?)
    }

    async fn fetch(&self, jwks_uri: &mut Option<String>) -> anyhow::Result<Arc<Fetched>> {
        if jwks_uri.is_none() {
            let discovery = format!("{}/.well-known/openid-configuration", self.issuer.trim_end_matches('/'));
            let document = self.get_json(&discovery).await?;
            let issuer = document.get("issuer").and_then(Value::as_str);
            anyhow::ensure!(
                issuer == Some(self.issuer.as_str()),
                "{discovery} names the issuer {issuer:?}, not {:?}",
                self.issuer
            );
            let uri = document.get("jwks_uri").and_then(Value::as_str);
            *jwks_uri = Some(uri.ok_or_else(|| anyhow::anyhow!("{discovery} names no jwks_uri"))?.to_owned());
        }
        let uri = jwks_uri.as_deref().expect("discovered above");
        let set: JwkSet = serde_json::from_value(self.get_json(uri).await?)?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            if jwk.common.public_key_use.as_ref().is_some_and(|u| *u != PublicKeyUse::Signature) {
                continue;
            }
            let kid = jwk.common.key_id.clone().unwrap_or_default();
            let Some(algorithm) = algorithm_of(jwk.common.key_algorithm, &jwk.algorithm) else {
                tracing::debug!(kid, "skipping an issuer key of no signing algorithm this gateway verifies");
                continue;
            };
            match DecodingKey::from_jwk(jwk) {
                Ok(key) => {
                    let validation = validation(algorithm, Some(&self.issuer), Some(&self.audience), self.leeway);
                    keys.insert(kid, Arc::new(IssuerKey { key, validation }));
                }
                Err(err) => tracing::warn!(kid, error = %err, "skipping an issuer key that cannot be read"),
            }
        }
        tracing::info!(issuer = %self.issuer, keys = keys.len(), "fetched the issuer's signing keys");
        let fetched = Arc::new(Fetched { keys, at: Instant::now() });
        *self.fetched.write().expect("keys lock") = Some(fetched.clone());
        Ok(fetched)
    }
}

/// The signing algorithm of a key: its JWK's `alg`, else the usual one of its type. Symmetric keys
/// are never taken from an issuer's public set.
fn algorithm_of(declared: Option<KeyAlgorithm>, parameters: &AlgorithmParameters) -> Option<Algorithm> {
    let from_type = match parameters {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Algorithm::ES256,
            EllipticCurve::P384 => Algorithm::ES384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
        AlgorithmParameters::OctetKey(_) => return None,
    };
    let Some(declared) = declared else {
        return Some(from_type);
    };
    let algorithm = match declared {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    };
    // An `alg` that does not fit the key's type is a broken key, not a choice.
    (family(algorithm) == family(from_type)).then_some(algorithm)
}

/// The kind of key an algorithm signs with.
fn family(algorithm: Algorithm) -> u8 {
    use Algorithm as A;
    match algorithm {
        A::HS256 | A::HS384 | A::HS512 => 0,
        A::RS256 | A::RS384 | A::RS512 | A::PS256 | A::PS384 | A::PS512 => 1,
        A::ES256 | A::ES384 => 2,
        A::EdDSA => 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
    }

    fn sign(header: Header, claims: Value, secret: &[u8]) -> String {
        encode(&header, &claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    #[tokio::test]
    async fn hs256_tokens_verify_with_their_secret_and_times() {
        let verifier = Verifier::hs256(SECRET, Some("me"), Some("parley"), Duration::from_secs(5));
        let good = json!({"sub": "u", "iss": "me", "aud": "parley", "exp": now() + 60});
        assert_eq!(verifier.verify(&sign(Header::default(), good.clone(), SECRET)).await.unwrap()["sub"], "u");
        let refused = |claims: Value, secret: &'static [u8]| {
            let token = sign(Header::default(), claims, secret);
            let verifier = &verifier;
            async move { verifier.verify(&token).await.unwrap_err() }
        };
        assert!(refused(good.clone(), b"another secret, as long as the one").await.contains("signature"));
        assert!(refused(json!({"sub": "u", "iss": "me", "aud": "parley", "exp": now() - 60}), SECRET)
            .await
            .contains("expired"));
        let early = json!({"sub": "u", "iss": "me", "aud": "parley", "exp": now() + 60, "nbf": now() + 60});
        assert!(refused(early, SECRET).await.contains("not valid yet"));
        assert!(refused(json!({"sub": "u", "iss": "you", "aud": "parley", "exp": now() + 60}), SECRET)
            .await
            .contains("issuer"));
        assert!(refused(json!({"sub": "u", "iss": "me", "aud": "other", "exp": now() + 60}), SECRET)
            .await
            .contains("audience"));
        assert!(verifier.verify("garbage").await.unwrap_err().contains("well-formed"));
        let hs512 = sign(Header::new(Algorithm::HS512), good, SECRET);
        assert!(verifier.verify(&hs512).await.unwrap_err().contains("algorithm"));
    }

    #[tokio::test]
    async fn an_unsigned_token_is_refused() {
        use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
        let verifier = Verifier::hs256(SECRET, None, None, Duration::ZERO);
        let part = |value: Value| URL_SAFE_NO_PAD.encode(value.to_string());
        let token =
            format!("{}.{}.", part(json!({"alg": "none", "typ": "JWT"})), part(json!({"sub": "u", "exp": now() + 60})));
        assert!(verifier.verify(&token).await.unwrap_err().contains("algorithm"));
    }

    #[test]
    fn a_key_verifies_only_an_algorithm_of_its_type() {
        let rsa: AlgorithmParameters = serde_json::from_value(json!({"kty": "RSA", "n": "AQAB", "e": "AQAB"})).unwrap();
        assert_eq!(algorithm_of(None, &rsa), Some(Algorithm::RS256));
        assert_eq!(algorithm_of(Some(KeyAlgorithm::PS256), &rsa), Some(Algorithm::PS256));
        assert_eq!(algorithm_of(Some(KeyAlgorithm::HS256), &rsa), None);
        assert_eq!(algorithm_of(Some(KeyAlgorithm::ES256), &rsa), None);
        let oct: AlgorithmParameters = serde_json::from_value(json!({"kty": "oct", "k": "c2VjcmV0"})).unwrap();
        assert_eq!(algorithm_of(None, &oct), None, "a public key set's secret is never trusted");
    }
}

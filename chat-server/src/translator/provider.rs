//! Translation providers behind one trait: Apertium APY and LibreTranslate, with ISO 639-1 codes mapped per provider.

use std::time::Duration;

use async_trait::async_trait;
use parley_contract::provider::Provider as Kind;
use serde::Deserialize;

/// Why a translation failed, and whether trying again can help.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider could not answer now (unreachable, overloaded, 5xx, rate limited): retry later.
    #[error("{provider} is unavailable: {detail}")]
    Transient { provider: &'static str, detail: String },
    /// The provider will never translate this (unsupported pair, rejected input): dead-letter it.
    #[error("{provider} cannot translate {from}→{to}: {detail}")]
    Permanent { provider: &'static str, from: String, to: String, detail: String },
}

/// A machine translation service.
#[async_trait]
pub trait Provider: Send + Sync {
    /// The name recorded in `MessageTranslated.provider`.
    fn name(&self) -> &'static str;
    /// Translates `text` from `from` to `to`, both ISO 639-1 codes (`from` may be `auto`).
    async fn translate(&self, text: &str, from: &str, to: &str) -> Result<String, ProviderError>;
    /// Texts one call may carry ([`Provider::translate_many`]); 1 when the API takes one at a time.
    fn max_batch(&self) -> usize {
        1
    }
    /// Translates several texts in one call, the translations in the same order.
    async fn translate_many(&self, texts: &[&str], from: &str, to: &str) -> Result<Vec<String>, ProviderError> {
        let mut translations = Vec::with_capacity(texts.len());
        for text in texts {
            translations.push(self.translate(text, from, to).await?);
        }
        Ok(translations)
    }
}

/// Texts one LibreTranslate call carries at most.
const LIBRETRANSLATE_BATCH: usize = 16;

/// Builds the configured provider.
pub fn build(kind: Kind, url: &str, api_key: Option<String>, timeout: Duration) -> reqwest::Result<Box<dyn Provider>> {
    let client = reqwest::Client::builder().timeout(timeout).connect_timeout(Duration::from_secs(5)).build()?;
    let base = url.trim_end_matches('/').to_owned();
    Ok(match kind {
        Kind::Apertium => Box::new(Apertium { client, base }),
        Kind::Libretranslate => Box::new(LibreTranslate { client, base, api_key }),
    })
}

fn transient(provider: &'static str) -> impl Fn(reqwest::Error) -> ProviderError {
    move |err| ProviderError::Transient { provider, detail: err.to_string() }
}

/// Sends `request` and returns the body of a successful answer; a failed one is classified.
async fn answer(
    provider: &'static str,
    request: reqwest::RequestBuilder,
    from: &str,
    to: &str,
) -> Result<String, ProviderError> {
    let response = request.send().await.map_err(transient(provider))?;
    let status = response.status();
    let body = response.text().await.map_err(transient(provider))?;
    if !status.is_success() {
        return Err(classify(provider, status, body, from, to));
    }
    Ok(body)
}

/// Sorts an HTTP failure status into retryable or not.
fn classify(provider: &'static str, status: reqwest::StatusCode, body: String, from: &str, to: &str) -> ProviderError {
    use reqwest::StatusCode;
    // A wrong key or URL is fixed by an operator, not by the message: keep the messages until then.
    let transient = status.is_server_error()
        || matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS
                | StatusCode::REQUEST_TIMEOUT
                | StatusCode::UNAUTHORIZED
                | StatusCode::FORBIDDEN
                | StatusCode::NOT_FOUND
        );
    if transient {
        ProviderError::Transient { provider, detail: format!("HTTP {status}: {body}") }
    } else {
        ProviderError::Permanent {
            provider,
            from: from.into(),
            to: to.into(),
            detail: format!("HTTP {status}: {body}"),
        }
    }
}

/// ISO 639-1 → the ISO 639-3 codes Apertium names its pairs with.
pub fn apertium_code(code: &str) -> Option<&'static str> {
    Some(match code {
        "en" => "eng",
        "es" => "spa",
        "ca" => "cat",
        "fr" => "fra",
        "de" => "deu",
        "pt" => "por",
        "it" => "ita",
        "gl" => "glg",
        "eu" => "eus",
        "oc" => "oci",
        "ro" => "ron",
        "nb" => "nob",
        "nn" => "nno",
        "sv" => "swe",
        "da" => "dan",
        "is" => "isl",
        "cy" => "cym",
        "br" => "bre",
        "eo" => "epo",
        "an" => "arg",
        "nl" => "nld",
        "af" => "afr",
        "mt" => "mlt",
        "ar" => "ara",
        "kk" => "kaz",
        "tt" => "tat",
        "ru" => "rus",
        "uk" => "ukr",
        "be" => "bel",
        "sr" => "srp",
        "hr" => "hrv",
        "bs" => "bos",
        "sl" => "slv",
        "mk" => "mkd",
        "bg" => "bul",
        "sq" => "sqi",
        "hi" => "hin",
        "ur" => "urd",
        _ => return None,
    })
}

/// Apertium APY: `GET /translate?langpair=eng|spa&q=…`.
struct Apertium {
    client: reqwest::Client,
    base: String,
}

#[derive(Deserialize)]
struct ApertiumAnswer {
    #[serde(rename = "responseData")]
    response_data: Option<ApertiumData>,
    #[serde(rename = "responseStatus")]
    response_status: Option<u16>,
}

#[derive(Deserialize)]
struct ApertiumData {
    #[serde(rename = "translatedText")]
    translated_text: String,
}

#[async_trait]
impl Provider for Apertium {
    fn name(&self) -> &'static str {
        Kind::Apertium.as_str()
    }

    async fn translate(&self, text: &str, from: &str, to: &str) -> Result<String, ProviderError> {
        let unsupported = |detail: String| ProviderError::Permanent {
            provider: Kind::Apertium.as_str(),
            from: from.into(),
            to: to.into(),
            detail,
        };
        let source = apertium_code(from).ok_or_else(|| {
            unsupported("Apertium cannot detect or map this source language; set an explicit sourceLanguage".into())
        })?;
        let target = apertium_code(to).ok_or_else(|| unsupported("no Apertium code is known for the target".into()))?;
        let request = self.client.post(format!("{}/translate", self.base)).form(&[
            ("langpair", format!("{source}|{target}").as_str()),
            ("q", text),
            ("markUnknown", "no"),
        ]);
        let body = answer(Kind::Apertium.as_str(), request, from, to).await?;
        match serde_json::from_str::<ApertiumAnswer>(&body) {
            Ok(ApertiumAnswer { response_data: Some(data), response_status: Some(200) | None }) => {
                Ok(data.translated_text)
            }
            _ => Err(unsupported(format!("unexpected answer: {body}"))),
        }
    }
}

/// LibreTranslate: `POST /translate {q, source, target, format, api_key}`.
struct LibreTranslate {
    client: reqwest::Client,
    base: String,
    api_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum LibreText {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct LibreAnswer {
    #[serde(rename = "translatedText")]
    translated_text: LibreText,
}

impl LibreTranslate {
    /// `POST /translate` with `q` (a text or an array of texts).
    async fn call(&self, q: serde_json::Value, from: &str, to: &str) -> Result<LibreText, ProviderError> {
        let mut body = serde_json::json!({"q": q, "source": from, "target": to, "format": "text"});
        if let Some(key) = &self.api_key {
            body["api_key"] = key.as_str().into();
        }
        let request = self.client.post(format!("{}/translate", self.base)).json(&body);
        let text = answer(Kind::Libretranslate.as_str(), request, from, to).await?;
        serde_json::from_str::<LibreAnswer>(&text).map(|a| a.translated_text).map_err(|err| ProviderError::Permanent {
            provider: Kind::Libretranslate.as_str(),
            from: from.into(),
            to: to.into(),
            detail: format!("unexpected answer ({err}): {text}"),
        })
    }
}

#[async_trait]
impl Provider for LibreTranslate {
    fn name(&self) -> &'static str {
        Kind::Libretranslate.as_str()
    }

    async fn translate(&self, text: &str, from: &str, to: &str) -> Result<String, ProviderError> {
        match self.call(text.into(), from, to).await? {
            LibreText::One(text) => Ok(text),
            LibreText::Many(mut texts) if texts.len() == 1 => Ok(texts.remove(0)),
            LibreText::Many(texts) => Err(self.miscount(from, to, 1, texts.len())),
        }
    }

    fn max_batch(&self) -> usize {
        LIBRETRANSLATE_BATCH
    }

    async fn translate_many(&self, texts: &[&str], from: &str, to: &str) -> Result<Vec<String>, ProviderError> {
        match self.call(texts.into(), from, to).await? {
            LibreText::Many(translations) if translations.len() == texts.len() => Ok(translations),
            LibreText::Many(translations) => Err(self.miscount(from, to, texts.len(), translations.len())),
            LibreText::One(text) if texts.len() == 1 => Ok(vec![text]),
            LibreText::One(_) => Err(self.miscount(from, to, texts.len(), 1)),
        }
    }
}

impl LibreTranslate {
    fn miscount(&self, from: &str, to: &str, sent: usize, got: usize) -> ProviderError {
        ProviderError::Permanent {
            provider: Kind::Libretranslate.as_str(),
            from: from.into(),
            to: to.into(),
            detail: format!("sent {sent} texts, got {got} translations back"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apertium_codes_map_iso_639_1_to_639_3() {
        assert_eq!(apertium_code("en"), Some("eng"));
        assert_eq!(apertium_code("es"), Some("spa"));
        assert_eq!(apertium_code("ca"), Some("cat"));
        assert_eq!(apertium_code("auto"), None);
    }

    #[test]
    fn server_errors_and_rate_limits_are_transient_client_errors_permanent() {
        let t = classify("x", reqwest::StatusCode::BAD_GATEWAY, String::new(), "en", "es");
        assert!(matches!(t, ProviderError::Transient { .. }));
        let t = classify("x", reqwest::StatusCode::TOO_MANY_REQUESTS, String::new(), "en", "es");
        assert!(matches!(t, ProviderError::Transient { .. }));
        let p = classify("x", reqwest::StatusCode::BAD_REQUEST, String::new(), "en", "xx");
        assert!(matches!(p, ProviderError::Permanent { .. }));
        let key = classify("x", reqwest::StatusCode::UNAUTHORIZED, String::new(), "en", "es");
        assert!(
            matches!(key, ProviderError::Transient { .. }),
            "a wrong key waits for an operator, not the dead letters"
        );
    }
}

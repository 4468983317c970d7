//! Wire messages between the roles: versioned JSON, as fixed in docs/architecture.md.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The version every message this build writes carries in `v`.
pub const WIRE_VERSION: u32 = 1;

/// A message a client sent, as the gateway publishes it to `<P>.posted`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessagePosted {
    pub v: u32,
    pub id: Uuid,
    pub chat_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// The signed-in sender's `sub`, when the gateway signs clients in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_id: Option<String>,
    pub text: String,
    pub source_language: String,
    pub sent_at: String,
    /// The message this one answers, in the same chat (threads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<Uuid>,
}

/// One translation of a [`MessagePosted`], as a translator publishes it to `<P>.translated`.
///
/// `sourceLanguage`, `sender` and `sentAt` are copied from the original (an addition to the
/// contract) so the fanout can deliver a translation without having seen its original.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageTranslated {
    pub v: u32,
    pub id: Uuid,
    pub chat_id: String,
    pub language: String,
    pub text: String,
    /// The provider that produced `text`; [`PASSTHROUGH_PROVIDER`] when the original already was in `language`.
    pub provider: String,
    pub source_language: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// The signed-in sender's `sub`, when the gateway signs clients in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_id: Option<String>,
    pub sent_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<Uuid>,
}

/// The `provider` of a translation that is the original text, already in the target language.
pub const PASSTHROUGH_PROVIDER: &str = "passthrough";

/// What the fanout publishes to `<P>.deliver` for every original and every translation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    pub v: u32,
    pub id: Uuid,
    pub chat_id: String,
    /// Per chat, strictly increasing over all deliveries of that chat (originals and translations).
    pub seq: u64,
    pub language: String,
    pub source_language: String,
    /// True for the text as it was sent, false for a translation.
    pub original: bool,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender: Option<String>,
    /// The signed-in sender's `sub`, when the gateway signs clients in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sender_id: Option<String>,
    pub sent_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<Uuid>,
}

impl Delivery {
    /// The delivery of an original message.
    pub fn of_original(posted: MessagePosted, seq: u64) -> Self {
        Self {
            v: WIRE_VERSION,
            id: posted.id,
            chat_id: posted.chat_id,
            seq,
            language: posted.source_language.clone(),
            source_language: posted.source_language,
            original: true,
            text: posted.text,
            sender: posted.sender,
            sender_id: posted.sender_id,
            sent_at: posted.sent_at,
            reply_to: posted.reply_to,
        }
    }

    /// The delivery of a translation.
    pub fn of_translation(translated: MessageTranslated, seq: u64) -> Self {
        Self {
            v: WIRE_VERSION,
            id: translated.id,
            chat_id: translated.chat_id,
            seq,
            language: translated.language,
            source_language: translated.source_language,
            original: false,
            text: translated.text,
            sender: translated.sender,
            sender_id: translated.sender_id,
            sent_at: translated.sent_at,
            reply_to: translated.reply_to,
        }
    }
}

/// Now, as the RFC 3339 timestamp the wire messages carry.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posted_uses_the_camel_case_names_of_the_contract() {
        let posted = MessagePosted {
            v: WIRE_VERSION,
            id: Uuid::nil(),
            chat_id: "c".into(),
            sender: None,
            sender_id: None,
            text: "hi".into(),
            source_language: "en".into(),
            sent_at: "2026-01-01T00:00:00.000Z".into(),
            reply_to: None,
        };
        let json = serde_json::to_value(&posted).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"v":1,"id":"00000000-0000-0000-0000-000000000000","chatId":"c",
                "text":"hi","sourceLanguage":"en","sentAt":"2026-01-01T00:00:00.000Z"})
        );
        assert_eq!(serde_json::from_value::<MessagePosted>(json).unwrap(), posted);
    }

    #[test]
    fn translation_delivery_keeps_the_id_and_is_not_original() {
        let t = MessageTranslated {
            v: 1,
            id: Uuid::now_v7(),
            chat_id: "c".into(),
            language: "es".into(),
            text: "hola".into(),
            provider: "apertium".into(),
            source_language: "en".into(),
            sender: Some("ana".into()),
            sender_id: None,
            sent_at: now_rfc3339(),
            reply_to: Some(Uuid::now_v7()),
        };
        let d = Delivery::of_translation(t.clone(), 7);
        assert_eq!((d.id, d.seq, d.original), (t.id, 7, false));
        assert_eq!((d.language.as_str(), d.source_language.as_str()), ("es", "en"));
        assert_eq!(d.reply_to, t.reply_to, "a translation belongs to the thread of its original");
    }
}

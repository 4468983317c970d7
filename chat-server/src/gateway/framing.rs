//! How a connection frames the results of one operation for its wire protocol, with the client's
//! operation id spliced into an already encoded result.

use axum::extract::ws::Utf8Bytes;

/// How a connection frames the results of one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// graphql-transport-ws: `{"type":"next","id":…,"payload":…}`, then `{"type":"complete","id":…}`.
    Next,
    /// Legacy graphql-ws: `{"type":"data","id":…,"payload":…}`, then `complete`.
    Data,
    /// The seed's plain frames: each result alone, and nothing at the end.
    Plain,
}

impl Framing {
    /// The frame carrying `payload` (an encoded GraphQL response) for operation `id`.
    pub fn result(self, id: &OperationId, payload: &Utf8Bytes) -> Utf8Bytes {
        let kind = match self {
            Self::Next => "next",
            Self::Data => "data",
            Self::Plain => return payload.clone(),
        };
        let mut frame = String::with_capacity(payload.len() + id.json.len() + 32);
        frame.push_str(r#"{"type":""#);
        frame.push_str(kind);
        frame.push_str(r#"","id":"#);
        frame.push_str(&id.json);
        frame.push_str(r#","payload":"#);
        frame.push_str(payload.as_str());
        frame.push('}');
        frame.into()
    }

    /// The frame that ends operation `id`, where the protocol has one.
    pub fn complete(self, id: &OperationId) -> Option<Utf8Bytes> {
        (self != Self::Plain).then(|| format!(r#"{{"type":"complete","id":{}}}"#, id.json).into())
    }
}

/// A client's operation id, with its JSON encoding made once.
#[derive(Debug, Clone)]
pub struct OperationId {
    pub raw: Box<str>,
    /// `raw` as a JSON string literal, quotes included.
    pub json: Box<str>,
}

impl OperationId {
    pub fn new(raw: &str) -> Self {
        let json = serde_json::to_string(raw).expect("a string always encodes");
        Self { raw: raw.into(), json: json.into() }
    }
}

-- Parley chat history: every delivery (original and translation) with its per-chat seq.
-- Written by the active fanout alone; read by the gateways.

CREATE TABLE parley_chats (
    chat_id         TEXT PRIMARY KEY,
    -- The highest seq ever given in this chat; kept when retention deletes deliveries.
    last_seq        BIGINT NOT NULL,
    last_message_at TIMESTAMPTZ NOT NULL
);

CREATE INDEX parley_chats_recent ON parley_chats (last_message_at DESC);

CREATE TABLE parley_deliveries (
    chat_id         TEXT NOT NULL,
    seq             BIGINT NOT NULL,
    message_id      UUID NOT NULL,
    language        TEXT NOT NULL,
    source_language TEXT NOT NULL,
    original        BOOLEAN NOT NULL,
    text            TEXT NOT NULL,
    sender          TEXT,
    -- As the wire messages carry it (RFC 3339).
    sent_at         TEXT NOT NULL,
    reply_to        UUID,
    stored_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (chat_id, seq),
    -- A redelivered original or translation is recognised, across restarts and failover.
    UNIQUE (message_id, language)
);

CREATE INDEX parley_deliveries_replies ON parley_deliveries (reply_to) WHERE reply_to IS NOT NULL;
CREATE INDEX parley_deliveries_stored_at ON parley_deliveries (stored_at);

-- Idempotency keys of sendMessage: a retry with the same key names the first attempt's message.
-- Written by the gateways (they need INSERT, UPDATE and SELECT on this table for keyed sends);
-- emptied with the history by the fanout's retention.

CREATE TABLE parley_idempotency_keys (
    chat_id    TEXT NOT NULL,
    -- '' for a message without a sender.
    sender     TEXT NOT NULL,
    key        TEXT NOT NULL,
    message_id UUID NOT NULL,
    sent_at    TEXT NOT NULL,
    claimed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (chat_id, sender, key)
);

CREATE INDEX parley_idempotency_keys_claimed_at ON parley_idempotency_keys (claimed_at);

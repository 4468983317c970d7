-- The signed-in sender's stable id (the token's `sub`), beside its display name; null for messages
-- sent without sign-in.
ALTER TABLE parley_deliveries ADD COLUMN sender_id text;

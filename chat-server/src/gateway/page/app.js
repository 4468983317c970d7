// Parley — the participants' chat page. Vanilla ES2020 module, no dependencies, no build step.
// Every URL is relative to the page itself, so the gateway may be served behind a path prefix.

const $ = (selector) => document.querySelector(selector);
const make = (tag, className, text) => {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text != null) node.textContent = text;
  return node;
};

const GRAPHQL_URL = new URL('graphql', location.href);
const WS_URL = new URL('graphql', location.href);
WS_URL.protocol = WS_URL.protocol === 'https:' ? 'wss:' : 'ws:';
const CONFIG_URL = new URL('chat-config.json', location.href);

const FIELDS = 'id chatId seq sender senderId language sourceLanguage original text sentAt replyTo';
const Q_CHATS = 'query { chats(first: 50) { id lastSeq lastMessageAt } }';
const Q_HISTORY = `query($chatId: ID!, $languages: [String!]) {
  messages(chatId: $chatId, languages: $languages, last: 50) { ${FIELDS} } }`;
const S_MESSAGES = `subscription($chatId: ID!, $languages: [String!], $after: Int) {
  messages(chatId: $chatId, languages: $languages, after: $after) { ${FIELDS} } }`;
const M_SEND = `mutation($chatId: ID!, $text: String!, $sender: String, $replyTo: ID) {
  sendMessage(chatId: $chatId, text: $text, sender: $sender, replyTo: $replyTo) { id } }`;

// Storage that never throws (private modes, disabled storage).
const storage = (area) => ({
  get(key) { try { return area().getItem(key); } catch { return null; } },
  set(key, value) {
    try { if (value == null) area().removeItem(key); else area().setItem(key, value); } catch { /* ignore */ }
  },
});
const local = storage(() => localStorage);
const session = storage(() => sessionStorage);

// ---------------------------------------------------------------------------------------------
// State

/** What a browser test waits on. */
const state = { room: null, language: 'en', maxSeq: 0, connected: false };
window.parley = { state };

let config = { auth: 'none', issuer: null, clientId: null, sourceLanguage: 'en', languages: [], history: true };
let historyOn = true; // false once the gateway says it keeps no history
let showOriginal = false;
const messages = new Map(); // id → record (one per message, merging original and translation)
let replyingTo = null; // record being answered
let unread = 0;
let divider = null; // the "New messages" <li>
let openCount = 0; // guards against out-of-order room loads
let roomReady = false; // history phase done: the subscription may start
let historyLoaded = false;
let sending = false;

const list = $('#messages');
const composer = $('#composer');
const sendButton = $('#send');

// ---------------------------------------------------------------------------------------------
// Small helpers

let noticeTimer = 0;
/** Shows (or clears) the alert under the message list. */
function notice(text) {
  clearTimeout(noticeTimer);
  $('#notice').textContent = text || '';
  if (text) noticeTimer = setTimeout(() => { $('#notice').textContent = ''; }, 15000);
}

function relativeTime(iso) {
  const at = Date.parse(iso);
  if (Number.isNaN(at)) return '';
  const seconds = Math.max(0, (Date.now() - at) / 1000);
  if (seconds < 60) return 'just now';
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) return `${minutes} min ago`;
  const hours = Math.floor(minutes / 60);
  if (hours < 24) return `${hours} h ago`;
  const days = Math.floor(hours / 24);
  if (days === 1) return 'yesterday';
  if (days < 7) return `${days} days ago`;
  return new Date(at).toLocaleDateString();
}

function absoluteTime(iso) {
  const at = new Date(iso);
  return Number.isNaN(at.getTime()) ? iso || '' : at.toLocaleString();
}

function languageName(code) {
  try {
    const own = new Intl.DisplayNames([code], { type: 'language' }).of(code);
    return own && own !== code ? `${own} (${code})` : code;
  } catch {
    return code;
  }
}

/** The payload of a JWT, or null when the token is not one. */
function jwtPayload(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const binary = atob(part.padEnd(Math.ceil(part.length / 4) * 4, '='));
    return JSON.parse(new TextDecoder().decode(Uint8Array.from(binary, (c) => c.charCodeAt(0))));
  } catch {
    return null;
  }
}

const base64url = (bytes) =>
  btoa(String.fromCharCode(...bytes)).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
const randomToken = () => base64url(crypto.getRandomValues(new Uint8Array(32)));

// ---------------------------------------------------------------------------------------------
// GraphQL over HTTP

class GraphQLError extends Error {
  constructor(message, code) {
    super(message);
    this.code = code;
  }
}

const STATUS_CODES = { 401: 'UNAUTHENTICATED', 403: 'FORBIDDEN', 429: 'RATE_LIMITED' };

async function gql(query, variables) {
  const headers = { 'Content-Type': 'application/json', Accept: 'application/json' };
  const token = bearer();
  if (token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(GRAPHQL_URL, { method: 'POST', headers, body: JSON.stringify({ query, variables }) });
  } catch {
    throw new GraphQLError('Could not reach the server', 'NETWORK');
  }
  // Refusals (401, 403, 429) still carry a GraphQL body: read it whatever the status.
  const body = await response.json().catch(() => null);
  const error = body?.errors?.[0];
  if (error) throw new GraphQLError(error.message, error.extensions?.code || STATUS_CODES[response.status]);
  if (!response.ok || !body?.data) {
    throw new GraphQLError(`The server answered ${response.status}`, STATUS_CODES[response.status] || 'HTTP');
  }
  return body.data;
}

// ---------------------------------------------------------------------------------------------
// Identity: a display name (auth none), a pasted token (jwt) or OIDC sign-in with PKCE (oidc)

const TOKENS_KEY = 'parley.oidc.tokens';
const PENDING_KEY = 'parley.oidc.pending';
const LAST_REDIRECT_KEY = 'parley.oidc.redirectedAt';
const SIGNED_OUT_KEY = 'parley.oidc.signedOut';
const JWT_KEY = 'parley.jwt';

const displayName = () => (local.get('parley.name') || '').trim();

/** The stored tokens: {access_token, id_token?, expires_at?} or null. */
function tokens() {
  if (config.auth === 'jwt') {
    const token = session.get(JWT_KEY);
    return token ? { access_token: token } : null;
  }
  if (config.auth === 'oidc') {
    try { return JSON.parse(session.get(TOKENS_KEY)); } catch { return null; }
  }
  return null;
}

const bearer = () => tokens()?.access_token || null;

function clearTokens() {
  session.set(JWT_KEY, null);
  session.set(TOKENS_KEY, null);
}

/** When the token expires (ms since the epoch), if known. */
function tokenExpiry() {
  const held = tokens();
  if (!held) return null;
  const exp = jwtPayload(held.access_token)?.exp;
  return exp ? exp * 1000 : held.expires_at || null;
}

function signedInName() {
  const held = tokens();
  if (!held) return null;
  const claims = [held.id_token && jwtPayload(held.id_token), jwtPayload(held.access_token)].filter(Boolean);
  for (const key of ['name', 'preferred_username', 'email', 'sub']) {
    const found = claims.find((c) => typeof c[key] === 'string' && c[key]);
    if (found) return found[key];
  }
  return 'you';
}

const redirectUri = () => location.origin + location.pathname;

let discovered = null;
async function discovery() {
  if (!discovered) {
    const url = `${String(config.issuer).replace(/\/+$/, '')}/.well-known/openid-configuration`;
    const response = await fetch(url);
    if (!response.ok) throw new Error(`the identity provider answered ${response.status}`);
    discovered = await response.json();
  }
  return discovered;
}

let signingIn = false;
/** Redirects to the identity provider (authorization code flow with PKCE, S256). */
async function signIn() {
  if (signingIn) return;
  signingIn = true;
  try {
    if (!config.issuer || !config.clientId) throw new Error('the gateway names no issuer or client id');
    if (!crypto.subtle) throw new Error('sign-in needs HTTPS (or localhost)');
    const meta = await discovery();
    const verifier = randomToken();
    const stateValue = randomToken();
    const digest = await crypto.subtle.digest('SHA-256', new TextEncoder().encode(verifier));
    // Keep the room (the hash) so that the return lands in the same place.
    const hash = state.room ? `#room=${encodeURIComponent(state.room)}` : location.hash;
    session.set(PENDING_KEY, JSON.stringify({ verifier, state: stateValue, hash }));
    session.set(LAST_REDIRECT_KEY, String(Date.now()));
    session.set(SIGNED_OUT_KEY, null);
    const url = new URL(meta.authorization_endpoint);
    const params = {
      response_type: 'code', client_id: config.clientId, redirect_uri: redirectUri(), scope: 'openid profile',
      state: stateValue, code_challenge: base64url(new Uint8Array(digest)), code_challenge_method: 'S256',
    };
    for (const [key, value] of Object.entries(params)) url.searchParams.set(key, value);
    location.assign(url.href);
  } catch (error) {
    signingIn = false;
    notice(`Cannot sign in: ${error.message}`);
  }
}

/** Sign-in that happens by itself, but not twice within 30 s (a refused token must not loop). */
function autoSignIn() {
  if (session.get(SIGNED_OUT_KEY)) {
    // Signed out on purpose: do not sign straight back in.
    notice('Signed out — sign in to read and send.');
    return false;
  }
  const last = Number(session.get(LAST_REDIRECT_KEY) || 0);
  if (Date.now() - last < 30000) {
    clearTokens();
    updateIdentity();
    notice('Sign-in was not accepted — use “Sign in” to try again.');
    return false;
  }
  signIn();
  return true;
}

/** Back from the identity provider: exchange the code for tokens. */
async function finishSignIn() {
  const query = new URLSearchParams(location.search);
  if (!query.has('code') && !query.has('error')) return;
  let pending = null;
  try { pending = JSON.parse(session.get(PENDING_KEY)); } catch { /* none */ }
  session.set(PENDING_KEY, null);
  history.replaceState(null, '', redirectUri() + (pending?.hash || location.hash));
  if (query.has('error')) throw new Error(query.get('error_description') || query.get('error'));
  if (!pending || pending.state !== query.get('state')) throw new Error('the answer does not match the request');
  const meta = await discovery();
  const response = await fetch(meta.token_endpoint, {
    method: 'POST',
    headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({
      grant_type: 'authorization_code', code: query.get('code'), redirect_uri: redirectUri(),
      client_id: config.clientId, code_verifier: pending.verifier,
    }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok || !body.access_token) throw new Error(body.error_description || body.error || `token endpoint answered ${response.status}`);
  session.set(TOKENS_KEY, JSON.stringify({
    access_token: body.access_token,
    id_token: body.id_token || null,
    expires_at: body.expires_in ? Date.now() + body.expires_in * 1000 : null,
  }));
}

let expiryTimer = 0;
function scheduleExpiry() {
  clearTimeout(expiryTimer);
  const at = tokenExpiry();
  if (!at) return;
  expiryTimer = setTimeout(tokenExpired, Math.min(Math.max(0, at - Date.now()), 2 ** 31 - 1));
}

function tokenExpired() {
  if (config.auth === 'oidc') {
    if (autoSignIn()) return;
  } else {
    clearTokens();
    notice('Your token has expired — paste a new one to send.');
  }
  updateIdentity();
  restartSocket();
}

/**
 * The server refused the credentials (HTTP 401 or close 4401). Returns true when the socket should
 * wait (a redirect is under way, or nothing can be read without a new token).
 */
function unauthorized() {
  const hadToken = !!bearer();
  if (config.auth === 'oidc') {
    autoSignIn(); // redirects, or leaves it to the user's "Sign in"
    return true;
  }
  if (config.auth === 'jwt') {
    clearTokens();
    updateIdentity();
    if (hadToken) {
      notice('Your token was refused or has expired — paste a new one.');
      return false; // read on without it, if the gateway lets anonymous readers in
    }
    notice('This chat needs a token — paste one below.');
    return true;
  }
  return false;
}

/** Shows the name form, the token box, the sign-in button or who is signed in. */
function updateIdentity() {
  const name = displayName();
  const signedIn = signedInName();
  const show = (selector, visible) => { $(selector).hidden = !visible; };
  show('#name-form', config.auth === 'none' && !name);
  show('#token-form', config.auth === 'jwt' && !signedIn);
  show('#sign-in-box', config.auth === 'oidc' && !signedIn);
  const who = config.auth === 'none' ? name : signedIn;
  show('#whoami', !!who);
  $('#whoami-label').textContent = config.auth === 'none' ? 'Sending as' : 'Signed in as';
  $('#whoami-name').textContent = who || '';
  show('#change-name', config.auth === 'none');
  show('#sign-out', config.auth !== 'none');
  $('#sign-out').textContent = config.auth === 'jwt' ? 'Forget token' : 'Sign out';
  scheduleExpiry();
  updateComposer();
}

// ---------------------------------------------------------------------------------------------
// WebSocket client (graphql-transport-ws) with reconnect, backoff and resume

const ws = { socket: null, acked: false, delay: 500, timer: 0, subId: null, nextId: 0, lost: false, waiting: false };
let reconnectedTimer = 0;

function setConnection(value, text) {
  document.body.dataset.connection = value;
  state.connected = value === 'open';
  const banner = $('#connection');
  clearTimeout(reconnectedTimer);
  banner.className = value;
  banner.textContent = text || '';
  banner.hidden = !text;
  if (value === 'open' && text) reconnectedTimer = setTimeout(() => { banner.hidden = true; }, 3000);
  updateComposer();
}

const wsSend = (message) => {
  if (ws.socket?.readyState === WebSocket.OPEN) ws.socket.send(JSON.stringify(message));
};

function connect() {
  clearTimeout(ws.timer);
  if (ws.socket) return;
  ws.waiting = false;
  const socket = new WebSocket(WS_URL, 'graphql-transport-ws');
  ws.socket = socket;
  ws.acked = false;
  // A server that never acknowledges is as good as gone.
  // A server that stays silent (no ack, no pong: a half-open connection) is given up on at once,
  // without waiting for a closing handshake that may never come.
  let heard = Date.now();
  let acked = false;
  const abandon = () => {
    socket.onclose = null;
    socket.close(4408, 'no answer');
    closed(4408);
  };
  const ackTimer = setTimeout(abandon, 10000);
  const liveness = setInterval(() => {
    if (!acked) return;
    if (Date.now() - heard > 25000) abandon();
    else if (socket.readyState === WebSocket.OPEN) socket.send('{"type":"ping"}');
  }, 10000);
  socket.onopen = () => {
    const token = bearer();
    wsSend({ type: 'connection_init', payload: token ? { authorization: `Bearer ${token}` } : {} });
  };
  socket.onmessage = (event) => {
    let message;
    try { message = JSON.parse(event.data); } catch { return; }
    heard = Date.now();
    switch (message.type) {
      case 'connection_ack':
        clearTimeout(ackTimer);
        acked = true;
        ws.acked = true;
        ws.delay = 500;
        setConnection('open', ws.lost ? 'Reconnected' : '');
        ws.lost = false;
        subscribeRoom();
        break;
      case 'ping':
        wsSend({ type: 'pong', payload: message.payload });
        break;
      case 'next':
        if (message.id === ws.subId) received(message.payload);
        break;
      case 'error':
        if (message.id === ws.subId) subscriptionFailed(message.payload);
        break;
      case 'complete':
        // The server ended the stream (e.g. after SLOW_CONSUMER): pick it up again from maxSeq.
        if (message.id === ws.subId) { ws.subId = null; setTimeout(subscribeRoom, 1000); }
        break;
      default:
    }
  };
  socket.onclose = (event) => closed(event.code);
  function closed(code) {
    clearTimeout(ackTimer);
    clearInterval(liveness);
    if (ws.socket !== socket) return; // replaced on purpose
    ws.socket = null;
    ws.subId = null;
    ws.acked = false;
    ws.lost = true;
    if (code === 4403) {
      setConnection('closed', 'You are not allowed to read this chat.');
      return; // no point in retrying
    }
    if (code === 4401 && unauthorized()) {
      ws.waiting = true;
      setConnection('closed', config.auth === 'oidc' ? 'Sign in to read this chat.' : 'A token is needed to read this chat.');
      return;
    }
    const why = code === 4429 ? 'Too many connections — reconnecting…' : 'Connection lost — reconnecting…';
    setConnection('closed', why);
    ws.timer = setTimeout(connect, ws.delay);
    ws.delay = Math.min(ws.delay * 2, 10000);
  }
}

/** Drops the socket and connects at once (new token, signed out). */
function restartSocket() {
  const old = ws.socket;
  ws.socket = null;
  ws.subId = null;
  if (old) old.close(1000, 'credentials changed'); // its onclose sees it was replaced
  ws.delay = 500;
  setConnection('connecting', 'Connecting…');
  connect();
}

/** Subscribes to the open room, resuming after the highest seq seen. */
function subscribeRoom() {
  if (!ws.acked || !state.room || !roomReady || ws.subId) return;
  ws.subId = String(++ws.nextId);
  const variables = { chatId: state.room, languages: [state.language] };
  // `after` replays from the history, so only when the gateway keeps one.
  if (historyOn && (historyLoaded || state.maxSeq > 0)) variables.after = state.maxSeq;
  wsSend({ type: 'subscribe', id: ws.subId, payload: { query: S_MESSAGES, variables } });
}

function unsubscribe() {
  if (ws.subId) wsSend({ type: 'complete', id: ws.subId });
  ws.subId = null;
}

function received(payload) {
  if (payload?.errors?.length) {
    const code = payload.errors[0].extensions?.code;
    if (code !== 'SLOW_CONSUMER') notice(payload.errors[0].message);
  }
  const delivery = payload?.data?.messages;
  if (delivery) ingest(delivery, true);
}

function subscriptionFailed(errors) {
  const first = Array.isArray(errors) ? errors[0] : errors;
  const code = first?.extensions?.code;
  ws.subId = null;
  if (code === 'HISTORY_DISABLED') {
    historyOn = false;
    roomsWithoutHistory();
    subscribeRoom();
    return;
  }
  if (code === 'FORBIDDEN') {
    notice('You are not allowed to read this chat.');
    return;
  }
  notice(`Live updates failed: ${first?.message || 'unknown error'}`);
  const room = state.room;
  setTimeout(() => { if (state.room === room) subscribeRoom(); }, 5000);
}

// ---------------------------------------------------------------------------------------------
// Messages: merge by id, render in the chosen language, threads, unread marker

const atBottom = () => list.scrollHeight - list.scrollTop - list.clientHeight < 48;
const scrollToBottom = () => { list.scrollTop = list.scrollHeight; };
const senderName = (record) => record.sender || record.senderId || 'Anonymous';

/** Whether messages get translated into `language` (so a missing translation is pending). */
const translatedInto = (language) => language !== config.sourceLanguage && config.languages.includes(language);

/** Takes one delivery (an original or a translation) into the list. */
function ingest(delivery, live) {
  if (!delivery || delivery.chatId !== state.room) return;
  if (delivery.seq > state.maxSeq) state.maxSeq = delivery.seq;
  const stick = atBottom();
  let record = messages.get(delivery.id);
  const isNew = !record;
  if (isNew) {
    record = {
      id: delivery.id, sender: delivery.sender, senderId: delivery.senderId, sentAt: delivery.sentAt,
      replyTo: delivery.replyTo, source: delivery.sourceLanguage, original: null, translations: {},
      children: [], depth: 0, arrived: Date.now(),
    };
    messages.set(record.id, record);
    build(record);
    place(record);
    $('#empty').hidden = true;
  }
  if (delivery.original) record.original = delivery.text;
  else record.translations[delivery.language] = delivery.text;
  record.source = delivery.sourceLanguage || record.source;
  render(record);
  if (isNew && live && (document.hidden || !stick)) markUnread(record);
  if (stick) scrollToBottom();
}

function build(record) {
  const item = make('li', 'message');
  item.dataset.id = record.id;
  const meta = make('div', 'meta');
  const time = make('time', 'time', relativeTime(record.sentAt));
  time.dateTime = record.sentAt || '';
  time.title = absoluteTime(record.sentAt);
  meta.append(make('span', 'sender', senderName(record)), ' ', time);
  record.text = make('p', 'text');
  record.pending = make('span', 'pending', 'translating…');
  record.originalText = make('p', 'original');
  const reply = make('button', 'reply-button', 'Reply');
  reply.type = 'button';
  reply.setAttribute('aria-label', `Reply to ${senderName(record)}`);
  reply.addEventListener('click', () => startReply(record));
  item.append(meta, record.text, reply);
  record.time = time;
  record.el = item;
}

const lastInThread = (record) => {
  while (record.children.length) record = record.children[record.children.length - 1];
  return record;
};

/** A reply goes right after its parent's thread; anything else (or an orphan reply) at the end. */
function place(record) {
  const parent = record.replyTo && messages.get(record.replyTo);
  if (parent) {
    const anchor = lastInThread(parent);
    parent.children.push(record);
    record.depth = parent.depth + 1;
    record.el.classList.add('reply');
    record.el.style.setProperty('--depth', String(Math.min(record.depth, 4)));
    const hidden = make('span', 'visually-hidden', ` in reply to ${senderName(parent)}`);
    record.el.querySelector('.meta').append(hidden);
    anchor.el.after(record.el);
  } else {
    if (record.replyTo) {
      record.el.classList.add('reply', 'orphan');
      record.text.before(make('p', 'in-reply-to', '↪ in reply to an earlier message'));
    }
    list.append(record.el);
  }
}

/** Shows the message in the chosen language, the original under it, or a pending note. */
function render(record) {
  const language = state.language;
  const translation = record.translations[language];
  let text;
  let textLanguage;
  let pending = false;
  let original = null;
  if (record.original != null && (record.source === language || translation == null)) {
    text = record.original;
    textLanguage = record.source;
    pending = record.source !== language && translatedInto(language);
  } else if (translation != null) {
    text = translation;
    textLanguage = language;
    if (showOriginal && record.original != null && record.source !== language) original = record.original;
  } else {
    // Only a translation into another language (should not happen with languages=[chosen]).
    const [first] = Object.entries(record.translations);
    [textLanguage, text] = first || [undefined, ''];
  }
  record.text.textContent = text;
  if (textLanguage) record.text.lang = textLanguage;
  if (pending) {
    if (!record.pending.isConnected) record.text.after(record.pending);
  } else {
    record.pending.remove();
  }
  if (original != null) {
    record.originalText.textContent = original;
    if (record.source) record.originalText.lang = record.source;
    if (!record.originalText.isConnected) record.text.after(record.originalText);
  } else {
    record.originalText.remove();
  }
}

function rerenderAll() {
  const stick = atBottom();
  for (const record of messages.values()) render(record);
  if (stick) scrollToBottom();
}

function markUnread(record) {
  unread += 1;
  if (!divider) {
    divider = make('li', 'unread-divider');
    divider.setAttribute('role', 'separator');
    divider.setAttribute('aria-label', 'New messages');
    divider.append(make('span', null, 'New messages'));
    record.el.before(divider);
  }
  updateUnread();
}

function clearUnread() {
  unread = 0;
  divider?.remove();
  divider = null;
  updateUnread();
}

function updateUnread() {
  document.title = unread ? `(${unread}) Parley` : 'Parley';
  const jump = $('#jump');
  jump.hidden = unread === 0;
  jump.textContent = `${unread} new message${unread === 1 ? '' : 's'} ↓`;
}

// Relative times, every 30 s (and a pending note that waits too long says so).
setInterval(() => {
  for (const record of messages.values()) {
    record.time.textContent = relativeTime(record.sentAt);
    if (record.pending.isConnected && Date.now() - record.arrived > 120000) {
      record.pending.textContent = 'translation not available yet';
    }
  }
}, 30000);

// ---------------------------------------------------------------------------------------------
// Replies and sending

function startReply(record) {
  replyingTo = record;
  const text = record.text.textContent;
  $('#replying-sender').textContent = senderName(record);
  $('#replying-excerpt').textContent = text.length > 80 ? `${text.slice(0, 80)}…` : text;
  $('#replying').hidden = false;
  composer.focus();
}

function cancelReply() {
  replyingTo = null;
  $('#replying').hidden = true;
}

/** Why sending is impossible right now, or null. */
function sendBlocker() {
  if (!state.room) return 'Open a room to send messages.';
  if (config.auth === 'none' && !displayName()) return 'Choose a display name to send messages.';
  if (config.auth === 'jwt' && !bearer()) return 'Paste a token to send messages.';
  if (config.auth === 'oidc' && !bearer()) return 'Sign in to send messages.';
  if (!state.connected) return 'Not connected — sending resumes once the connection is back.';
  return null;
}

function updateComposer() {
  const blocker = sendBlocker();
  composer.disabled = !!blocker;
  sendButton.disabled = !!blocker || sending;
  $('#composer-hint').textContent = blocker || '';
}

const SEND_ERRORS = {
  RATE_LIMITED: 'You’re sending too fast — wait a moment and try again.',
  FORBIDDEN: 'You may read but not send here.',
  UNAUTHENTICATED: 'You need to sign in again to send.',
  UNAVAILABLE: 'The chat is unavailable right now — try again in a moment.',
  NETWORK: 'Could not reach the server — check your connection.',
};

async function send() {
  const text = composer.value;
  if (!text.trim() || sending || sendBlocker()) return;
  sending = true;
  updateComposer();
  notice('');
  const variables = { chatId: state.room, text };
  if (replyingTo) variables.replyTo = replyingTo.id;
  if (config.auth === 'none') variables.sender = displayName(); // signed-in senders come from the token
  scrollToBottom();
  clearUnread();
  try {
    await gql(M_SEND, variables);
    composer.value = '';
    cancelReply();
  } catch (error) {
    notice(SEND_ERRORS[error.code] || `Not sent: ${error.message}`);
    if (error.code === 'UNAUTHENTICATED' && config.auth !== 'none') unauthorized();
  } finally {
    sending = false;
    updateComposer();
  }
}

// ---------------------------------------------------------------------------------------------
// Rooms

let rooms = [];

function renderRooms() {
  const ul = $('#rooms');
  ul.replaceChildren(...rooms.map((room) => {
    const item = make('li');
    const button = make('button', 'room', room.id);
    button.type = 'button';
    if (room.lastMessageAt) button.title = `Last message ${absoluteTime(room.lastMessageAt)}`;
    if (room.id === state.room) button.setAttribute('aria-current', 'true');
    button.addEventListener('click', () => { openRoom(room.id); collapseRooms(); });
    item.append(button);
    return item;
  }));
}

function roomsWithoutHistory() {
  const note = $('#rooms-note');
  note.textContent = 'This gateway keeps no history, so there is no room list: type a room name to open it.';
  note.hidden = false;
}

async function loadRooms() {
  if (!historyOn) { roomsWithoutHistory(); return; }
  try {
    const data = await gql(Q_CHATS);
    const known = new Map((data.chats || []).map((c) => [c.id, c]));
    // Rooms opened here but not yet spoken in stay on the list.
    for (const room of rooms) if (!known.has(room.id)) known.set(room.id, room);
    rooms = [...known.values()];
    renderRooms();
  } catch (error) {
    if (error.code === 'HISTORY_DISABLED') { historyOn = false; roomsWithoutHistory(); return; }
    const note = $('#rooms-note');
    note.textContent = `Could not load the rooms: ${error.message}`;
    note.hidden = false;
  }
}

function roomFromHash() {
  const room = new URLSearchParams(location.hash.slice(1)).get('room');
  return room && room.trim() ? room.trim() : null;
}

/** Opens a room: history first, then the subscription from the highest seq of that history. */
async function openRoom(id) {
  const room = String(id || '').trim();
  if (!room) return;
  const mine = ++openCount;
  unsubscribe();
  roomReady = false;
  historyLoaded = false;
  state.room = room;
  state.maxSeq = 0;
  local.set('parley.room', room);
  const hash = `#room=${encodeURIComponent(room)}`;
  if (location.hash !== hash) history.replaceState(null, '', hash);
  $('#room-title').textContent = room;
  if (!rooms.some((r) => r.id === room)) rooms.unshift({ id: room });
  renderRooms();
  messages.clear();
  list.replaceChildren();
  divider = null;
  clearUnread();
  cancelReply();
  $('#empty').hidden = true;
  updateComposer();

  if (historyOn) {
    list.setAttribute('aria-busy', 'true');
    try {
      const data = await gql(Q_HISTORY, { chatId: room, languages: [state.language] });
      if (mine !== openCount) return;
      for (const delivery of data.messages || []) ingest(delivery, false);
      historyLoaded = true;
    } catch (error) {
      if (mine !== openCount) return;
      if (error.code === 'HISTORY_DISABLED') {
        historyOn = false;
        roomsWithoutHistory();
      } else if (error.code === 'UNAUTHENTICATED' && config.auth !== 'none') {
        unauthorized();
      } else {
        notice(`Could not load the history: ${error.message}`);
      }
    } finally {
      if (mine === openCount) list.removeAttribute('aria-busy');
    }
  }
  if (mine !== openCount) return;
  $('#empty').hidden = messages.size > 0;
  scrollToBottom();
  roomReady = true;
  subscribeRoom();
}

function collapseRooms() {
  const toggle = $('#rooms-toggle');
  if (toggle.getAttribute('aria-expanded') === 'true') {
    toggle.setAttribute('aria-expanded', 'false');
    document.body.classList.remove('rooms-open');
  }
}

// ---------------------------------------------------------------------------------------------
// Wiring

function setupLanguages() {
  const select = $('#language');
  const codes = [config.sourceLanguage, ...config.languages.filter((l) => l !== config.sourceLanguage)];
  select.replaceChildren(...codes.map((code) => {
    const option = make('option', null, languageName(code));
    option.value = code;
    return option;
  }));
  const saved = local.get('parley.language');
  state.language = codes.includes(saved) ? saved : config.sourceLanguage;
  select.value = state.language;
  showOriginal = local.get('parley.showOriginal') === 'true';
  $('#show-original').checked = showOriginal;
}

function bindUi() {
  $('#language').addEventListener('change', (event) => {
    state.language = event.target.value;
    local.set('parley.language', state.language);
    if (state.room) openRoom(state.room); // history again, in the new language
  });
  $('#show-original').addEventListener('change', (event) => {
    showOriginal = event.target.checked;
    local.set('parley.showOriginal', String(showOriginal));
    rerenderAll();
  });
  $('#rooms-toggle').addEventListener('click', (event) => {
    const open = event.currentTarget.getAttribute('aria-expanded') !== 'true';
    event.currentTarget.setAttribute('aria-expanded', String(open));
    document.body.classList.toggle('rooms-open', open);
    if (open) $('#rooms button, #room-input')?.focus();
  });
  $('#rooms-panel').addEventListener('keydown', (event) => {
    if (event.key === 'Escape' && document.body.classList.contains('rooms-open')) {
      collapseRooms();
      $('#rooms-toggle').focus();
    }
  });
  $('#room-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const input = $('#room-input');
    if (!input.value.trim()) return;
    openRoom(input.value);
    input.value = '';
    collapseRooms();
    if (composer.disabled) list.focus();
    else composer.focus();
  });
  window.addEventListener('hashchange', () => {
    const room = roomFromHash();
    if (room && room !== state.room) openRoom(room);
  });

  $('#name-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const name = $('#name-input').value.trim();
    if (!name) return;
    local.set('parley.name', name);
    updateIdentity();
    composer.focus();
  });
  $('#change-name').addEventListener('click', () => {
    $('#name-input').value = displayName();
    local.set('parley.name', null);
    updateIdentity();
    $('#name-input').focus();
  });
  $('#token-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const token = $('#token-input').value.trim().replace(/^Bearer\s+/i, '');
    if (!token) return;
    session.set(JWT_KEY, token);
    $('#token-input').value = '';
    notice('');
    updateIdentity();
    restartSocket();
    if (state.room) openRoom(state.room);
  });
  $('#sign-in').addEventListener('click', signIn);
  $('#sign-out').addEventListener('click', () => {
    if (config.auth === 'oidc') session.set(SIGNED_OUT_KEY, '1');
    clearTokens();
    updateIdentity();
    restartSocket();
  });

  $('#composer-form').addEventListener('submit', (event) => {
    event.preventDefault();
    send();
  });
  composer.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    } else if (event.key === 'Escape' && replyingTo) {
      cancelReply();
    }
  });
  $('#reply-cancel').addEventListener('click', () => { cancelReply(); composer.focus(); });

  // Unread: cleared once the newest message is in view.
  list.addEventListener('scroll', () => { if (!document.hidden && atBottom()) clearUnread(); }, { passive: true });
  document.addEventListener('visibilitychange', () => { if (!document.hidden && atBottom()) clearUnread(); });
  $('#jump').addEventListener('click', () => { scrollToBottom(); clearUnread(); list.focus(); });

  window.addEventListener('online', () => {
    if (!ws.socket && !ws.waiting) { ws.delay = 500; connect(); }
  });
}

async function loadConfig() {
  try {
    const response = await fetch(CONFIG_URL, { headers: { Accept: 'application/json' } });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const loaded = await response.json();
    return { ...config, ...loaded, languages: Array.isArray(loaded.languages) ? loaded.languages : [] };
  } catch (error) {
    notice(`Could not load the chat configuration (${error.message}); using defaults.`);
    return config;
  }
}

async function main() {
  bindUi();
  setConnection('connecting', 'Connecting…');
  config = await loadConfig();
  historyOn = config.history !== false;
  setupLanguages();
  if (config.auth === 'oidc') {
    try { await finishSignIn(); } catch (error) { notice(`Sign-in failed: ${error.message}`); }
  }
  updateIdentity();
  connect();
  const wanted = roomFromHash() || local.get('parley.room');
  const roomsLoaded = loadRooms();
  if (wanted) {
    openRoom(wanted);
  } else {
    // Nothing remembered: the most recently active room, else a default one.
    await roomsLoaded;
    if (!state.room) openRoom(rooms[0]?.id || 'general');
  }
  setInterval(() => { if (historyOn && !document.hidden) loadRooms(); }, 60000);
}

main();

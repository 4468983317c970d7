// A real OpenID Connect provider (npm `oidc-provider`) for Parley's integration tests.
//
// Tests start it as a child process and get real RS256 JWT access tokens from its token endpoint.
//
// Start:   (cd tests/oidc && npm ci)   once, then   PORT=0 node tests/oidc/provider.mjs
//          PORT=0 picks a free port. When listening, it prints exactly one line to stdout:
//            {"issuer":"http://127.0.0.1:<port>","port":<port>}
//          and runs until killed (SIGTERM/SIGINT exit 0). Everything else goes to stderr.
//          OIDC_EXTRA_CLIENTS='[{"client_id":"x","client_secret":"s","groups":["g"],"name":"X"}]' adds clients.
//
// Provider routes: /.well-known/openid-configuration, /jwks, /token (others are off or unused).
//
// Token request (client_credentials; secret as form fields, or HTTP Basic also works), POSTed to <issuer>/token:
//   grant_type=client_credentials  client_id=alice  client_secret=alice-secret
//   [resource=urn:<audience>]   optional; without it the audience is "parley" (resource urn:parley).
//   Resource indicators must be absolute URIs, so `resource=urn:wrong-audience` gives aud "wrong-audience"
//   (a `urn:` prefix is stripped to make the audience; any other URI is used as the audience as it is).
// Response: {"access_token":"<JWT>","expires_in":3600,"token_type":"Bearer"}.
// The JWT: header {alg:"RS256",typ:"at+jwt",kid}; claims iss, aud, sub (= client_id), client_id, exp, iat,
// jti, plus name (the client's display name) and groups (only for clients that have groups).
//
// Clients (secret = <id>-secret):   alice, bob: groups chat-users, chat-senders  ("Alice Example", "Bob Example")
//   reader: chat-users ("Rita Reader")   nogroups: no groups claim ("No Groups")
//   shortlived: chat-users, chat-senders ("Short Lived"), tokens live 3 s. All others live 1 hour.
//
// Test-only routes (same server, outside the provider):
//   POST /test/rotate[?drop_old=1]  new RSA key with a new kid becomes the signing key; JWKS lists it first and
//                                   keeps the old keys unless drop_old=1. Answers {"kid":"<new kid>"}.
//   POST /test/sign   JSON body = the exact claims to sign (nothing is added); an optional "header" object is
//                     merged over {alg:"RS256",typ:"JWT",kid:<current kid>}. Always signed RS256 with the current
//                     private key, whatever the header says. Answers {"token":"<compact JWS>"}.
//   GET  /test/public-key-pem        the current signing key's public key, SPKI PEM (for HS256-with-public-key tests).
import http from 'node:http';
import { generateKeyPairSync, randomUUID, sign } from 'node:crypto';
import Provider from 'oidc-provider';

// oidc-provider prints notices with console.info; stdout is reserved for the one JSON line.
console.log = console.info = console.error;

const CLIENTS = [
  { client_id: 'alice', groups: ['chat-users', 'chat-senders'], name: 'Alice Example' },
  { client_id: 'bob', groups: ['chat-users', 'chat-senders'], name: 'Bob Example' },
  { client_id: 'reader', groups: ['chat-users'], name: 'Rita Reader' },
  { client_id: 'nogroups', name: 'No Groups' },
  { client_id: 'shortlived', groups: ['chat-users', 'chat-senders'], name: 'Short Lived' },
  ...JSON.parse(process.env.OIDC_EXTRA_CLIENTS || '[]'),
].map(({ client_id, client_secret = `${client_id}-secret`, groups, name }) => ({
  client_id,
  client_secret,
  ...(groups ? { groups } : {}),
  ...(name ? { client_name: name } : {}),
  grant_types: ['client_credentials'],
  response_types: [],
  redirect_uris: [],
  token_endpoint_auth_method: 'client_secret_post',
}));
const TTL = { shortlived: 3 };

const b64url = (v) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');

function newKey() {
  const { privateKey, publicKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
  const kid = randomUUID();
  return { kid, privateKey, publicKey, jwk: { ...privateKey.export({ format: 'jwk' }), kid, alg: 'RS256', use: 'sig' } };
}

function makeProvider(issuer, keys) {
  const signingKid = keys[0].kid;
  const provider = new Provider(issuer, {
    clients: CLIENTS,
    jwks: { keys: keys.map((k) => k.jwk) },
    cookies: { keys: ['parley-test-cookies'] },
    clientDefaults: { id_token_signed_response_alg: 'RS256' },
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: false },
      revocation: { enabled: false },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => 'urn:parley',
        getResourceServerInfo: (_ctx, resource) => ({
          scope: '',
          audience: resource.replace(/^urn:/, ''),
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: 'RS256', kid: signingKid } },
        }),
      },
    },
    extraClientMetadata: {
      properties: ['groups'],
      validator(_ctx, key, value) {
        if (key === 'groups' && value !== undefined
          && !(Array.isArray(value) && value.every((g) => typeof g === 'string'))) {
          throw new Error('groups must be an array of strings');
        }
      },
    },
    async extraTokenClaims(ctx, token) {
      const client = ctx?.oidc?.client ?? await ctx.oidc.provider.Client.find(token.clientId);
      return {
        ...(client?.clientName ? { name: client.clientName } : {}),
        ...(client?.groups ? { groups: client.groups } : {}),
      };
    },
    ttl: { ClientCredentials: (_ctx, _token, client) => TTL[client.clientId] ?? 3600 },
    // JSON error bodies rather than HTML pages keep test failures readable.
    renderError(ctx, out) { ctx.type = 'json'; ctx.body = out; },
  });
  provider.on('server_error', (_ctx, err) => console.error('server_error', err));
  provider.on('grant.error', (_ctx, err) => console.error('grant.error', err.message, err.error_description ?? ''));
  return provider;
}

let keys = [newKey()];
let issuer;
let handle; // the current provider's (req, res) callback; swapped on rotation

function reply(res, status, body, type = 'application/json') {
  res.writeHead(status, { 'content-type': type });
  res.end(type === 'application/json' ? JSON.stringify(body) : body);
}

async function readJson(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString('utf8') || '{}');
}

async function testRoute(req, res, url) {
  const route = `${req.method} ${url.pathname}`;
  if (route === 'POST /test/rotate') {
    const key = newKey();
    keys = url.searchParams.get('drop_old') === '1' ? [key] : [key, ...keys];
    handle = makeProvider(issuer, keys).callback();
    console.error(`rotated: signing kid ${key.kid}, jwks has ${keys.length} key(s)`);
    return reply(res, 200, { kid: key.kid });
  }
  if (route === 'POST /test/sign') {
    const { header: overrides = {}, ...claims } = await readJson(req);
    const header = { alg: 'RS256', typ: 'JWT', kid: keys[0].kid, ...overrides };
    const input = `${b64url(header)}.${b64url(claims)}`;
    const signature = sign('sha256', Buffer.from(input), keys[0].privateKey).toString('base64url');
    return reply(res, 200, { token: `${input}.${signature}` });
  }
  if (route === 'GET /test/public-key-pem') {
    return reply(res, 200, keys[0].publicKey.export({ type: 'spki', format: 'pem' }), 'application/x-pem-file');
  }
  return reply(res, 404, { error: 'no such test route' });
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, issuer);
  if (url.pathname.startsWith('/test/')) {
    testRoute(req, res, url).catch((err) => reply(res, 400, { error: String(err?.message ?? err) }));
  } else {
    handle(req, res);
  }
});

server.listen(Number(process.env.PORT || 0), '127.0.0.1', () => {
  const { port } = server.address();
  issuer = `http://127.0.0.1:${port}`;
  handle = makeProvider(issuer, keys).callback();
  process.stdout.write(`${JSON.stringify({ issuer, port })}\n`);
});

for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => process.exit(0));

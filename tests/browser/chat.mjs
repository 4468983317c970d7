// Drives Parley's chat page in the system's headless Chromium (puppeteer-core), for
// chat-server/tests/chat/browser.rs, which starts the chat (standalone, Apertium es and ca) behind a
// TCP proxy it controls, and this script with:
//   PAGE_URL     the page through the proxy;  ROOM  the room to join;
//   SCREENSHOTS  where to write chat-desktop.png and chat-phone.png;  CHROMIUM  the browser binary.
// It speaks to the test over lines: it prints "LOADED <bytes>" (the first load, as transferred),
// "CUT" when it wants the network cut, "DOWN" once both pages saw the connection drop, and reads
// "SENT <id> <id>…" (messages sent meanwhile, the network back) from stdin. It exits 0 when every
// check passed; any failure throws (exit 1) with what was expected.
import puppeteer from 'puppeteer-core';
import { createInterface } from 'node:readline';

const { PAGE_URL, ROOM, SCREENSHOTS, CHROMIUM = '/usr/bin/chromium' } = process.env;
const TIMEOUT = 30_000;
const input = createInterface({ input: process.stdin });
const lines = input[Symbol.asyncIterator]();
const say = (line) => process.stdout.write(`${line}\n`);

const browser = await puppeteer.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: ['--no-sandbox', '--disable-dev-shm-usage'],
});
try {
  // Two participants, each in a browser context of its own (own storage), in their own language.
  const open = async (name, language, measure) => {
    const context = await browser.createBrowserContext();
    const page = await context.newPage();
    page.setDefaultTimeout(TIMEOUT);
    page.on('pageerror', (err) => process.stderr.write(`${name}: page error: ${err}\n`));
    let bytes = 0;
    if (measure) {
      const cdp = await page.createCDPSession();
      await cdp.send('Network.enable');
      cdp.on('Network.loadingFinished', (e) => { bytes += e.encodedDataLength; });
    }
    await page.setViewport({ width: 1280, height: 800 });
    await page.goto(`${PAGE_URL}#room=${encodeURIComponent(ROOM)}`, { waitUntil: 'networkidle0' });
    if (measure) say(`LOADED ${bytes}`);
    await page.select('#language', language);
    await page.waitForFunction(() => document.body.dataset.connection === 'open');
    await page.type('#name-input', name);
    await page.$eval('#name-form', (form) => form.requestSubmit());
    return page;
  };
  const ana = await open('Ana', 'es', true);
  const jordi = await open('Jordi', 'ca', false);
  // Both subscribed to the room: the subscription goes live before the first send.
  for (const page of [ana, jordi]) {
    await page.waitForFunction((room) => window.parley?.state?.room === room && window.parley.state.connected, {}, ROOM);
  }

  // Ana sends; both see it, each in their own language, the translation replacing "translating…".
  await ana.type('#composer', 'Good morning');
  await ana.keyboard.press('Enter');
  const shows = (page, text) => page.waitForFunction(
    (text) => [...document.querySelectorAll('.message')].some(
      (m) => !m.querySelector('.pending') && m.querySelector('.text')?.textContent.includes(text)),
    {}, text);
  await shows(jordi, 'Bon dia');
  await shows(ana, 'Buenos días');
  const sender = await jordi.$eval('.message .sender', (e) => e.textContent);
  if (!sender.includes('Ana')) throw new Error(`the sender shows as ${sender}`);
  // The original, on demand.
  await jordi.click('#show-original');
  await jordi.waitForFunction(() => [...document.querySelectorAll('.message .original')]
    .some((e) => e.textContent.includes('Good morning')));

  // A reload shows the history.
  await jordi.reload({ waitUntil: 'networkidle0' });
  await shows(jordi, 'Bon dia');
  await jordi.waitForFunction(() => document.body.dataset.connection === 'open');

  // Screenshots: desktop and phone width.
  await jordi.screenshot({ path: `${SCREENSHOTS}/chat-desktop.png` });
  await ana.setViewport({ width: 375, height: 740, isMobile: true, hasTouch: true });
  await ana.screenshot({ path: `${SCREENSHOTS}/chat-phone.png` });

  // The network drops; messages are sent meanwhile; once it returns, both pages show them all.
  say('CUT');
  for (const page of [ana, jordi]) {
    await page.waitForFunction(() => document.body.dataset.connection === 'closed');
  }
  say('DOWN');
  const sent = (await lines.next()).value;
  if (!sent?.startsWith('SENT ')) throw new Error(`expected SENT, got ${sent}`);
  const ids = sent.slice(5).trim().split(/\s+/);
  for (const page of [ana, jordi]) {
    await page.waitForFunction(() => document.body.dataset.connection === 'open', { timeout: 60_000 });
    await page.waitForFunction(
      (ids) => ids.every((id) => document.querySelector(`.message[data-id="${id}"]`)), {}, ids);
  }
  say('OK');
} finally {
  input.close();
  await browser.close();
}
// stdin would keep the process alive.
process.exit(0);

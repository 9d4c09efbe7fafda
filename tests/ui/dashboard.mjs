// Browser test of the admin dashboard (gateway/ui), driven by playwright-core
// against a running gateway.
//
//   PLAYWRIGHT_CORE=/abs/path/to/playwright-core \
//   CHROMIUM=/usr/bin/chromium UI_URL=http://127.0.0.1:8081/ui \
//   ADMIN_KEY=... PHOTO=tests/fixtures/images/coffee.jpg \
//   SCREENSHOT=/tmp/dashboard.png WORKERS_TARGET=2 \
//   node tests/ui/dashboard.mjs
//
// Enters the admin key, resizes the preprocess pool to WORKERS_TARGET and
// waits until that many workers are ready, scores PHOTO in the playground,
// takes a full-page screenshot, and fails on any page error or console
// error. Prints one line of JSON on success; exits 1 with a message on
// stderr otherwise.

import { createRequire } from 'node:module';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const OVERALL_MS = 90_000;
const STEP_MS = 30_000;

function env(name, fallback) {
  const v = process.env[name];
  if (v === undefined || v === '') {
    if (fallback !== undefined) return fallback;
    throw new Error(`environment variable ${name} is not set`);
  }
  return v;
}

async function loadPlaywright(dir) {
  const abs = path.resolve(dir);
  let mod;
  try {
    mod = createRequire(import.meta.url)(abs);
  } catch (requireError) {
    try {
      mod = await import(pathToFileURL(path.join(abs, 'index.mjs')).href);
    } catch (importError) {
      throw new Error(
        `cannot load playwright-core from ${abs}: require: ${requireError.message}; import: ${importError.message}`,
      );
    }
  }
  const chromium = mod.chromium || (mod.default && mod.default.chromium);
  if (!chromium) throw new Error(`playwright-core at ${abs} has no chromium export`);
  return chromium;
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: timed out after ${ms / 1000} s`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

const pageErrors = [];
let authed = false;
let browser = null;
let page = null;

async function run() {
  const chromium = await loadPlaywright(env('PLAYWRIGHT_CORE'));
  const executablePath = env('CHROMIUM', '/usr/bin/chromium');
  const url = env('UI_URL');
  const adminKey = env('ADMIN_KEY', '');
  const photo = path.resolve(env('PHOTO'));
  const target = String(Number.parseInt(env('WORKERS_TARGET'), 10));
  if (target === 'NaN') throw new Error('WORKERS_TARGET is not a number');

  browser = await chromium.launch({
    executablePath,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  page = await context.newPage();
  page.setDefaultTimeout(STEP_MS);
  page.on('pageerror', (err) => {
    pageErrors.push(`pageerror: ${err && err.message ? err.message : String(err)}`);
  });
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    const text = msg.text();
    // Until a poll with the key has succeeded, a poll may be answered 401
    // (the page starts without a key), which Chromium logs as a failed
    // resource load: those are expected.
    if (!authed && /status of 401\b/.test(text)) return;
    const loc = msg.location();
    pageErrors.push(`console.error: ${text}${loc && loc.url ? ` (${loc.url}:${loc.lineNumber})` : ''}`);
  });

  const resp = await page.goto(url, { waitUntil: 'load' });
  if (!resp || !resp.ok()) throw new Error(`GET ${url} answered ${resp ? resp.status() : 'nothing'}`);

  await page.fill('#admin-key', adminKey);
  await page.click('#admin-key-save');
  await page.waitForSelector('body[data-ready="1"]', { timeout: STEP_MS });
  authed = true;

  await page.fill('#workers-input', target);
  await page.click('#workers-apply');
  try {
    await page.waitForFunction(
      (t) => {
        const d = document.getElementById('workers-desired');
        const r = document.getElementById('workers-ready');
        return d && r && d.textContent.trim() === t && r.textContent.trim() === t;
      },
      target,
      { timeout: STEP_MS, polling: 250 },
    );
  } catch (e) {
    const now = await page.evaluate(() => ({
      desired: document.getElementById('workers-desired')?.textContent,
      ready: document.getElementById('workers-ready')?.textContent,
      status: document.getElementById('change-status')?.textContent,
    }));
    throw new Error(
      `pool did not reach ${target} workers: desired ${now.desired}, ready ${now.ready}; change status: ${now.status}`,
    );
  }

  await page.waitForSelector('#play-model option', { state: 'attached', timeout: STEP_MS });
  const model = await page.$eval('#play-model option', (o) => o.value);
  await page.selectOption('#play-model', model);
  await page.setInputFiles('#play-file', photo);
  await page.click('#play-submit');
  try {
    await page.waitForSelector('#play-top[data-score], #play-result[data-error]', {
      state: 'attached',
      timeout: STEP_MS,
    });
  } catch (e) {
    const text = await page.$eval('#play-result', (r) => r.textContent);
    throw new Error(`no score within ${STEP_MS / 1000} s; playground shows: ${text.trim()}`);
  }
  const result = await page.evaluate(() => {
    const top = document.getElementById('play-top');
    const res = document.getElementById('play-result');
    return {
      error: res.dataset.error || null,
      text: res.textContent.trim(),
      label: top ? top.dataset.label : null,
      score: top ? top.dataset.score : null,
      desired: document.getElementById('workers-desired').textContent.trim(),
      ready: document.getElementById('workers-ready').textContent.trim(),
    };
  });
  if (result.error) throw new Error(`the playground answered ${result.error}: ${result.text}`);
  const score = Number(result.score);
  if (!result.label || !Number.isFinite(score)) {
    throw new Error(`bad top score: label ${JSON.stringify(result.label)}, score ${JSON.stringify(result.score)}`);
  }

  // Let one more poll land so late errors show up.
  await page.waitForTimeout(1200);
  await screenshot();
  if (pageErrors.length) throw new Error(`page errors:\n  ${pageErrors.join('\n  ')}`);

  return {
    workers_desired: Number(result.desired),
    workers_ready: Number(result.ready),
    label: result.label,
    score,
    page_errors: pageErrors,
  };
}

let shot = false;
async function screenshot() {
  if (shot || !page) return;
  const file = process.env.SCREENSHOT;
  if (!file) return;
  shot = true;
  await withTimeout(page.screenshot({ path: path.resolve(file), fullPage: true, timeout: 10_000 }), 12_000, 'screenshot');
}

let code = 1;
try {
  const out = await withTimeout(run(), OVERALL_MS, 'dashboard test');
  process.stdout.write(`${JSON.stringify(out)}\n`);
  code = 0;
} catch (e) {
  try {
    await screenshot();
  } catch (se) {
    process.stderr.write(`screenshot failed: ${se.message}\n`);
  }
  process.stderr.write(`dashboard test failed: ${e && e.stack ? e.stack : e}\n`);
  if (pageErrors.length) process.stderr.write(`page errors:\n  ${pageErrors.join('\n  ')}\n`);
} finally {
  if (browser) {
    try {
      await withTimeout(browser.close(), 10_000, 'closing the browser');
    } catch (ce) {
      process.stderr.write(`closing the browser: ${ce.message}\n`);
    }
  }
}
process.exit(code);

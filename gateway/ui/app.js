// mmgate dashboard: polls GET /admin/pools and GET /metrics every second,
// draws the pools, live charts (uPlot) and the scoring playground.
// Plain browser JavaScript, no build step. Text from the gateway is only
// ever inserted with textContent.
'use strict';

(() => {
  const POLL_MS = 1000;
  const WINDOW_S = 300; // charts show the last 5 minutes
  const TENANT_WINDOW_S = 10; // the tenant and resource tables
  const KEY_STORE = 'mmgate.adminKey';
  const CHART_H = 190;
  const TOTAL_COLOUR = '#334155';
  const PALETTE = ['#2563eb', '#0d9488', '#d97706', '#7c3aed', '#db2777', '#65a30d', '#0891b2', '#b45309', '#4f46e5', '#be123c'];
  const MAX_LABELS_LISTED = 25;
  const MAX_TIMELINE_LABELS = 8;

  const $ = (id) => document.getElementById(id);

  const state = {
    key: readKey(),
    pools: null, // last GET /admin/pools answer
    samples: [], // raw metric samples {t, m}, the last TENANT_WINDOW_S or so
    points: [], // chart points, the last WINDOW_S
    changing: false,
    polling: false,
    pollAgain: false,
    pollTimer: null,
    waitingForKey: false,
    charts: {}, // name -> {u, sig, el}
    playChart: null,
    modelRows: new Map(), // model name -> row elements
    modelNames: '',
  };

  // ---------------------------------------------------------------- helpers

  function readKey() {
    try {
      return sessionStorage.getItem(KEY_STORE) || '';
    } catch (_) {
      return '';
    }
  }

  function storeKey(key) {
    try {
      if (key) sessionStorage.setItem(KEY_STORE, key);
      else sessionStorage.removeItem(KEY_STORE);
    } catch (_) {
      // Storage refused (privacy mode): the key lives in memory only.
    }
  }

  /** An element with attributes and children (strings become text nodes). */
  function h(tag, attrs, ...children) {
    const e = document.createElement(tag);
    if (attrs) {
      for (const [k, v] of Object.entries(attrs)) {
        if (v === undefined || v === null || v === false) continue;
        if (k === 'class') e.className = v;
        else if (k === 'text') e.textContent = v;
        else if (k.startsWith('data-')) e.setAttribute(k, String(v));
        else if (k in e && typeof e[k] !== 'function') e[k] = v;
        else e.setAttribute(k, String(v));
      }
    }
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }

  /** Replaces the children of `e`; null, undefined and false are skipped. */
  function fill(e, ...children) {
    e.replaceChildren(...children.filter((c) => c !== null && c !== undefined && c !== false));
  }

  function setText(id, v) {
    const e = typeof id === 'string' ? $(id) : id;
    if (!e) return;
    const s = v === null || v === undefined ? '–' : String(v);
    if (e.textContent !== s) e.textContent = s;
  }

  function isNum(v) {
    return typeof v === 'number' && Number.isFinite(v);
  }

  /** A rate, latency or count for display: fewer decimals as it grows. */
  function fmt(v) {
    if (!isNum(v)) return '–';
    const a = Math.abs(v);
    if (a === 0) return '0';
    if (a < 10) return v.toFixed(2);
    if (a < 100) return v.toFixed(1);
    return Math.round(v).toLocaleString('en-US');
  }

  function fmtScore(v) {
    return isNum(v) ? v.toFixed(4) : 'n/a';
  }

  function fmtPct(v) {
    return isNum(v) ? `${(v * 100).toFixed(1)} %` : '–';
  }

  function fmtBytes(b) {
    if (!isNum(b)) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (b >= 1024 && i < units.length - 1) {
      b /= 1024;
      i++;
    }
    return `${b.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
  }

  function yesNo(v) {
    if (v === true) return 'yes';
    if (v === false) return 'no';
    return '–';
  }

  function clock(d) {
    return d.toLocaleTimeString('en-GB', { hour12: false });
  }

  // -------------------------------------------------------------------- API

  /**
   * One request to the gateway. Resolves (never rejects) to
   * {ok, status, data (parsed JSON or null), text, error: {code, message}}.
   */
  async function api(method, path, opts = {}) {
    const headers = {};
    if (state.key) headers.Authorization = `Bearer ${state.key}`;
    let body;
    if (opts.json !== undefined) {
      headers['Content-Type'] = 'application/json';
      body = JSON.stringify(opts.json);
    } else if (opts.body !== undefined) {
      headers['Content-Type'] = opts.contentType || 'application/octet-stream';
      body = opts.body;
    }
    const ctl = new AbortController();
    const timeoutMs = opts.timeoutMs || 10000;
    const timer = setTimeout(() => ctl.abort(), timeoutMs);
    let resp;
    let text;
    try {
      resp = await fetch(path, {
        method,
        headers,
        body,
        cache: 'no-store',
        credentials: 'same-origin',
        signal: ctl.signal,
      });
      text = await resp.text();
    } catch (e) {
      const timedOut = ctl.signal.aborted;
      return {
        ok: false,
        status: 0,
        data: null,
        text: '',
        error: timedOut
          ? { code: 'timeout', message: `no answer within ${timeoutMs / 1000} s` }
          : { code: 'network_error', message: `the gateway could not be reached (${e && e.message ? e.message : e})` },
      };
    } finally {
      clearTimeout(timer);
    }
    let data = null;
    const ct = resp.headers.get('content-type') || '';
    if (ct.includes('json') || /^\s*[{[]/.test(text)) {
      try {
        data = JSON.parse(text);
      } catch (_) {
        data = null;
      }
    }
    let error = null;
    if (!resp.ok) {
      const e = data && data.error;
      if (e && typeof e === 'object' && e.code) {
        error = { code: String(e.code), message: String(e.message || '') };
      } else {
        error = {
          code: `http_${resp.status}`,
          message: (text || resp.statusText || '').slice(0, 300),
        };
      }
      if (resp.status === 401) needKey(error);
    }
    return { ok: resp.ok, status: resp.status, data, text, error };
  }

  // ------------------------------------------------------------------- auth

  function needKey(error) {
    state.waitingForKey = true;
    const msg = $('auth-msg');
    fill(msg,
      h('strong', null, 'Admin key needed. '),
      state.key
        ? 'The gateway refused the admin key you entered: enter the right one above and press "Use key".'
        : 'This gateway\'s admin API takes the admin key: enter it above and press "Use key".',
      ' ',
      h('code', null, `${error.code}: ${error.message}`),
    );
    msg.hidden = false;
    setGwState('key', 'admin key needed', '');
    $('admin-key').focus({ preventScroll: true });
  }

  function showKeyNote() {
    setText('admin-key-note', state.key ? 'key set for this tab' : 'no key');
  }

  function saveKey(ev) {
    ev.preventDefault();
    const input = $('admin-key');
    state.key = input.value.trim();
    input.value = '';
    storeKey(state.key);
    showKeyNote();
    $('auth-msg').hidden = true;
    state.waitingForKey = false;
    requestPoll();
  }

  function clearKey() {
    state.key = '';
    storeKey('');
    $('admin-key').value = '';
    showKeyNote();
    requestPoll();
  }

  // ---------------------------------------------------------------- polling

  function requestPoll() {
    if (state.polling) {
      state.pollAgain = true;
      return;
    }
    clearTimeout(state.pollTimer);
    state.pollTimer = setTimeout(poll, 0);
  }

  async function poll() {
    state.pollTimer = null;
    if (state.polling) return;
    state.polling = true;
    state.pollAgain = false;
    const started = performance.now();
    let waitKey = false;
    try {
      const [pools, metrics] = await Promise.all([
        api('GET', '/admin/pools', { timeoutMs: 5000 }),
        api('GET', '/metrics', { timeoutMs: 5000 }),
      ]);
      if (pools.status === 401 || metrics.status === 401) {
        waitKey = true;
        return;
      }
      state.waitingForKey = false;
      $('auth-msg').hidden = true;
      if (pools.ok && pools.data && pools.data.preprocess) {
        renderPools(pools.data);
      }
      if (metrics.ok) {
        ingestMetrics(parseProm(metrics.text), pools.ok ? pools.data : null);
      }
      if (pools.ok && metrics.ok) {
        $('poll-error').hidden = true;
        if (document.body.dataset.ready !== '1') document.body.dataset.ready = '1';
      } else {
        const bad = pools.ok ? metrics : pools;
        const what = pools.ok ? 'GET /metrics' : 'GET /admin/pools';
        const pe = $('poll-error');
        fill(pe,
          h('strong', null, `${what} failed. `),
          h('code', null, `${bad.error.code}: ${bad.error.message}`),
        );
        pe.hidden = false;
        if (!pools.ok) setGwState('down', bad.status === 0 ? 'unreachable' : 'error', `${what}: ${bad.error.code}`);
      }
    } catch (e) {
      // A bug here must not stop the polling; report it on the page.
      const pe = $('poll-error');
      fill(pe, h('strong', null, 'Dashboard error: '), String(e && e.message ? e.message : e));
      pe.hidden = false;
    } finally {
      state.polling = false;
      if (state.pollAgain) {
        state.pollTimer = setTimeout(poll, 0);
      } else if (!waitKey) {
        const spent = performance.now() - started;
        state.pollTimer = setTimeout(poll, Math.max(0, POLL_MS - spent));
      }
      // Waiting for a key: no more polls until one is entered.
    }
  }

  // ------------------------------------------------------------ gateway state

  function setGwState(kind, label, detail) {
    const pill = $('gw-state');
    pill.className = `pill pill-${kind}`;
    setText(pill, label);
    setText('gw-detail', detail);
  }

  function updateGwState(p) {
    const pre = p.preprocess;
    const ex = p.executor;
    let kind;
    let label;
    if (ex.ready && pre.ready > 0 && pre.ready >= pre.desired) {
      kind = 'ok';
      label = 'ready';
    } else if (ex.ready && pre.ready > 0) {
      kind = 'warn';
      label = 'degraded';
    } else {
      kind = 'down';
      label = 'not ready';
    }
    const detail = `${pre.ready}/${pre.desired} workers ready · executor ${ex.ready ? 'ready' : 'not ready'} · updated ${clock(new Date())}`;
    setGwState(kind, label, detail);
  }

  // ------------------------------------------------------------------ pools

  function renderPools(p) {
    state.pools = p;
    const pre = p.preprocess;
    const ex = p.executor;
    updateGwState(p);

    setText('workers-desired', pre.desired);
    setText('workers-ready', pre.ready);
    setText('pre-alive', pre.alive);
    setText('pre-minmax', `${pre.min} / ${pre.max}`);
    setText('pre-threads', pre.threads);
    setText('pre-busy', pre.busy);
    setText('pre-qimages', pre.queued_images);
    setText('pre-qvideos', pre.queued_videos);
    setText('pre-restarts', pre.restarts);
    setText('pre-retired', pre.retired);

    const wi = $('workers-input');
    wi.min = String(pre.min);
    wi.max = String(pre.max);
    if (wi.dataset.dirty !== '1' && document.activeElement !== wi) {
      if (wi.value !== String(pre.desired)) wi.value = String(pre.desired);
    }

    const rows = (pre.members || []).slice().sort((a, b) => a.index - b.index).map((m) => {
      let st = 'serving';
      let cls = 'ok';
      if (m.retiring) {
        st = 'retiring';
        cls = 'warn';
      } else if (m.recycling) {
        st = 'recycling';
        cls = 'warn';
      } else if (!m.ready) {
        st = 'starting';
        cls = 'muted';
      }
      return h(
        'tr',
        null,
        h('td', null, String(m.index)),
        h('td', { class: 'mono' }, m.pid === null || m.pid === undefined ? '–' : String(m.pid)),
        h('td', { class: 'num' }, String(m.threads)),
        h('td', null, yesNo(m.ready)),
        h('td', { class: 'num' }, String(m.busy)),
        h('td', { class: 'num' }, String(m.jobs)),
        h('td', { class: 'num' }, String(m.restarts ?? '–')),
        h('td', null, h('span', { class: `tag tag-${cls}` }, st)),
      );
    });
    if (rows.length === 0) rows.push(h('tr', null, h('td', { colSpan: 8, class: 'muted' }, 'no workers')));
    fill($('members-body'), ...rows);

    setText('exe-ready', yesNo(ex.ready));
    setText('exe-pid', ex.pid ?? '–');
    setText('exe-alive', ex.alive);
    setText('exe-restarts', ex.restarts);
    setText('exe-retiring', ex.retiring);
    const models = ex.models || [];
    setText('exe-pending', models.reduce((s, m) => s + (m.pending || 0), 0));
    $('exe-ready').className = ex.ready ? 'good' : 'bad';

    renderModels(models);
    renderPlayModels(models);
    updateControls();
  }

  function modelRow(name) {
    const input = h('input', {
      id: `instances-input-${name}`,
      type: 'number',
      min: '1',
      step: '1',
      inputMode: 'numeric',
      class: 'small-num',
    });
    const apply = h('button', { id: `instances-apply-${name}`, type: 'button', text: 'Apply' });
    const load = h('button', { id: `load-${name}`, type: 'button', class: 'quiet', text: 'Load' });
    const unload = h('button', { id: `unload-${name}`, type: 'button', class: 'quiet', text: 'Unload' });
    const label = h('label', { class: 'sr-only', htmlFor: input.id, text: `Instances of ${name}` });
    apply.setAttribute('aria-label', `Apply instances of ${name}`);
    load.setAttribute('aria-label', `Load ${name}`);
    unload.setAttribute('aria-label', `Unload ${name}`);
    input.addEventListener('input', () => {
      input.dataset.dirty = '1';
    });
    input.addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter') {
        ev.preventDefault();
        applyInstances(name);
      }
    });
    apply.addEventListener('click', () => applyInstances(name));
    load.addEventListener('click', () => loadModel(name, true));
    unload.addEventListener('click', () => loadModel(name, false));
    const cells = {
      loaded: h('td'),
      instances: h('td', { class: 'num' }),
      intra: h('td', { class: 'num' }),
      batch: h('td', { class: 'num' }),
      delay: h('td', { class: 'num' }),
      pending: h('td', { class: 'num' }),
      runtime: h('td', { class: 'runtime' }),
    };
    const tr = h(
      'tr',
      null,
      h('th', { scope: 'row', class: 'mono' }, name),
      cells.loaded,
      cells.instances,
      cells.intra,
      cells.batch,
      cells.delay,
      cells.pending,
      cells.runtime,
      h('td', null, h('div', { class: 'rowctl' }, label, input, apply, load, unload)),
    );
    return { tr, input, apply, load, unload, cells, model: null };
  }

  function renderModels(models) {
    const body = $('models-body');
    const seen = new Set();
    const order = [];
    for (const m of models) {
      seen.add(m.name);
      let row = state.modelRows.get(m.name);
      if (!row) {
        row = modelRow(m.name);
        state.modelRows.set(m.name, row);
      }
      row.model = m;
      order.push(row.tr);
      const c = row.cells;
      setText(c.loaded, m.loaded === undefined ? '–' : yesNo(m.loaded));
      c.loaded.className = m.loaded === false ? 'muted' : '';
      setText(c.instances, m.instances);
      setText(c.intra, m.intra_threads);
      setText(c.batch, m.max_batch);
      setText(c.delay, m.max_queue_delay_us);
      setText(c.pending, m.pending);
      const rt = m.runtime;
      if (rt) {
        const main = `${rt.backend} · ${rt.precision}`;
        const sub = [rt.device, rt.layout].filter(Boolean).join(' · ');
        const sig = `${main}|${sub}|${(rt.fallbacks || []).join('|')}`;
        if (c.runtime.dataset.sig !== sig) {
          c.runtime.dataset.sig = sig;
          const fb = rt.fallbacks && rt.fallbacks.length ? h('div', { class: 'sub warn-text' }, rt.fallbacks.join('; ')) : null;
          fill(c.runtime, h('div', null, main), sub ? h('div', { class: 'sub' }, sub) : null, fb);
        }
      } else if (c.runtime.dataset.sig !== '') {
        c.runtime.dataset.sig = '';
        fill(c.runtime, h('span', { class: 'muted' }, 'not loaded'));
      }
      if (row.input.dataset.dirty !== '1' && document.activeElement !== row.input) {
        if (row.input.value !== String(m.instances)) row.input.value = String(m.instances);
      }
    }
    for (const [name, row] of state.modelRows) {
      if (!seen.has(name)) {
        row.tr.remove();
        state.modelRows.delete(name);
      }
    }
    // Keep the server's order without re-creating rows (inputs keep focus).
    order.forEach((tr, i) => {
      if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
    });
    if (models.length === 0) {
      fill(body, h('tr', null, h('td', { colSpan: 9, class: 'muted' }, 'no models')));
    } else {
      for (const extra of Array.from(body.children).slice(order.length)) extra.remove();
    }
  }

  function updateControls() {
    const p = state.pools;
    const busy = state.changing;
    const pre = p && p.preprocess;
    $('workers-input').disabled = !pre || busy;
    $('workers-apply').disabled = !pre || busy;
    $('workers-minus').disabled = !pre || busy || pre.desired <= pre.min;
    $('workers-plus').disabled = !pre || busy || pre.desired >= pre.max;
    for (const row of state.modelRows.values()) {
      const m = row.model;
      row.apply.disabled = busy;
      row.input.disabled = busy;
      row.load.disabled = busy || (m && m.loaded === true);
      row.unload.disabled = busy || (m && m.loaded === false);
    }
  }

  // ---------------------------------------------------------------- changes

  function setChangeStatus(kind, text, error) {
    const e = $('change-status');
    e.dataset.state = kind;
    if (error) {
      e.dataset.code = error.code;
      fill(e,
        h('span', { class: 'status-dot', 'aria-hidden': 'true' }),
        `${text}: `,
        h('code', { class: 'err-code' }, error.code),
        ' ',
        error.message,
      );
    } else {
      delete e.dataset.code;
      fill(e, h('span', { class: 'status-dot', 'aria-hidden': 'true' }), text);
    }
  }

  async function change(desc, method, path, json, timeoutMs) {
    if (state.changing) return false;
    state.changing = true;
    updateControls();
    setChangeStatus('pending', `${desc}…`);
    const t0 = performance.now();
    try {
      const r = await api(method, path, { json, timeoutMs: timeoutMs || 15000 });
      const secs = ((performance.now() - t0) / 1000).toFixed(1);
      if (r.ok) {
        if (r.data && r.data.preprocess && r.data.executor) renderPools(r.data);
        setChangeStatus('ok', `${desc}: done in ${secs} s (${clock(new Date())})`);
        return true;
      }
      setChangeStatus('error', `${desc}: refused (HTTP ${r.status || 'no answer'})`, r.error);
      return false;
    } finally {
      state.changing = false;
      updateControls();
      if (!state.waitingForKey) requestPoll();
    }
  }

  function parseCount(v) {
    const s = String(v).trim();
    if (!/^\d+$/.test(s)) return null;
    const n = Number(s);
    return Number.isSafeInteger(n) ? n : null;
  }

  async function resizeWorkers(n) {
    if (n === null) {
      setChangeStatus('error', 'Resize preprocess pool', { code: 'bad_input', message: 'give a whole number of workers' });
      return;
    }
    const ok = await change(`Resize preprocess pool to ${n} workers`, 'PUT', '/admin/pools/preprocess', { workers: n });
    if (ok) {
      const wi = $('workers-input');
      delete wi.dataset.dirty;
      if (state.pools) wi.value = String(state.pools.preprocess.desired);
    }
  }

  async function applyInstances(name) {
    const row = state.modelRows.get(name);
    if (!row) return;
    const n = parseCount(row.input.value);
    if (n === null) {
      setChangeStatus('error', `Change ${name}`, { code: 'bad_input', message: 'give a whole number of instances' });
      return;
    }
    const ok = await change(`Set ${name} to ${n} instances`, 'PUT', `/admin/models/${encodeURIComponent(name)}`, { instances: n }, 120000);
    if (ok) {
      delete row.input.dataset.dirty;
      if (row.model) row.input.value = String(row.model.instances);
    }
  }

  function loadModel(name, load) {
    const verb = load ? 'load' : 'unload';
    return change(`${load ? 'Load' : 'Unload'} ${name}`, 'POST', `/admin/models/${encodeURIComponent(name)}/${verb}`, undefined, 120000);
  }

  // ----------------------------------------------------------- prometheus

  /** Unescapes a label value of the text format. */
  function unescapeLabel(s) {
    return s.replace(/\\(.)/g, (_, c) => (c === 'n' ? '\n' : c));
  }

  function parseValue(s) {
    if (s === '+Inf' || s === 'Inf') return Infinity;
    if (s === '-Inf') return -Infinity;
    if (s === 'NaN') return NaN;
    return Number(s);
  }

  /**
   * The Prometheus text format as {name: [{labels, value, key}]}; comments
   * and lines it cannot read are skipped.
   */
  function parseProm(text) {
    const out = Object.create(null);
    const lineRe = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?\s*$/;
    const labelRe = /\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?/y;
    for (const raw of text.split('\n')) {
      const line = raw.trim();
      if (!line || line[0] === '#') continue;
      const m = lineRe.exec(line);
      if (!m) continue;
      const labels = Object.create(null);
      if (m[3]) {
        labelRe.lastIndex = 0;
        let lm;
        while (labelRe.lastIndex < m[3].length && (lm = labelRe.exec(m[3]))) {
          labels[lm[1]] = unescapeLabel(lm[2]);
        }
      }
      const value = parseValue(m[4]);
      const key = Object.keys(labels).sort().map((k) => `${k}=${labels[k]}`).join('\u0001');
      (out[m[1]] || (out[m[1]] = [])).push({ labels, value, key });
    }
    return out;
  }

  function series(m, name) {
    return m[name] || [];
  }

  /**
   * Increase of counter `name` from `prev` to `cur`, per series: a series
   * new since `prev` counts from 0; one that went down was reset and counts
   * from 0 too.
   */
  function increases(cur, prev, name) {
    const before = new Map(series(prev, name).map((s) => [s.key, s.value]));
    return series(cur, name).map((s) => {
      const b = before.get(s.key);
      let d = b === undefined ? s.value : s.value - b;
      if (d < 0) d = s.value;
      return { labels: s.labels, d };
    });
  }

  /** Prometheus' histogram_quantile over cumulative [le, count] pairs. */
  function quantile(q, buckets) {
    if (buckets.length === 0) return null;
    const total = buckets[buckets.length - 1][1];
    if (!(total > 0)) return null;
    const rank = q * total;
    let prevLe = 0;
    let prevCum = 0;
    for (const [le, cum] of buckets) {
      if (cum >= rank) {
        if (le === Infinity) return prevLe;
        if (cum === prevCum) return le;
        return prevLe + ((le - prevLe) * (rank - prevCum)) / (cum - prevCum);
      }
      prevLe = le;
      prevCum = cum;
    }
    return prevLe;
  }

  function latencyQuantiles(cur, prev) {
    const byLe = new Map();
    for (const { labels, d } of increases(cur, prev, 'mmgate_request_duration_seconds_bucket')) {
      const le = parseValue(labels.le);
      if (Number.isNaN(le)) continue;
      byLe.set(le, (byLe.get(le) || 0) + d);
    }
    const buckets = Array.from(byLe.entries()).sort((a, b) => a[0] - b[0]);
    // Sums of per-model cumulative counts stay cumulative; guard against a
    // scrape that caught a bucket between its neighbours' updates.
    for (let i = 1; i < buckets.length; i++) {
      if (buckets[i][1] < buckets[i - 1][1]) buckets[i][1] = buckets[i - 1][1];
    }
    const p50 = quantile(0.5, buckets);
    const p99 = quantile(0.99, buckets);
    return { p50: p50 === null ? null : p50 * 1000, p99: p99 === null ? null : p99 * 1000 };
  }

  /** Requests and errors (answers not 2xx) per tenant between two samples. */
  function tenantLoad(cur, prev) {
    const out = new Map();
    for (const { labels, d } of increases(cur, prev, 'mmgate_requests_total')) {
      const t = labels.tenant === undefined ? '' : labels.tenant;
      const e = out.get(t) || { req: 0, err: 0 };
      e.req += d;
      if (!String(labels.code || '').startsWith('2')) e.err += d;
      out.set(t, e);
    }
    return out;
  }

  function byLabel(m, name, label) {
    const out = new Map();
    for (const s of series(m, name)) {
      const k = s.labels[label] === undefined ? '' : s.labels[label];
      out.set(k, (out.get(k) || 0) + s.value);
    }
    return out;
  }

  // ------------------------------------------------------------- ingestion

  function ingestMetrics(m, pools) {
    const t = Date.now() / 1000;
    const prev = state.samples.length ? state.samples[state.samples.length - 1] : null;
    const sample = { t, m };
    state.samples.push(sample);
    while (state.samples.length > 2 && state.samples[1].t <= t - TENANT_WINDOW_S) state.samples.shift();

    const point = { t, total: null, tenants: new Map(), p50: null, p99: null, qPre: null, qExe: null };
    if (prev && t > prev.t) {
      const dt = t - prev.t;
      const load = tenantLoad(m, prev.m);
      let total = 0;
      for (const [tenant, v] of load) {
        point.tenants.set(tenant, v.req / dt);
        total += v.req;
      }
      point.total = total / dt;
      const lat = latencyQuantiles(m, prev.m);
      point.p50 = lat.p50;
      point.p99 = lat.p99;
    }
    if (pools && pools.preprocess && pools.executor) {
      point.qPre = (pools.preprocess.queued_images || 0) + (pools.preprocess.queued_videos || 0);
      point.qExe = (pools.executor.models || []).reduce((s, x) => s + (x.pending || 0), 0);
    } else {
      const q = byLabel(m, 'mmgate_queue_depth', 'stage').get('preprocess');
      if (isNum(q)) point.qPre = q;
    }
    state.points.push(point);
    while (state.points.length && state.points[0].t < t - WINDOW_S) state.points.shift();

    renderNow(point);
    renderTenants();
    renderResources();
    renderCharts();
  }

  function renderNow(p) {
    setText('tp-now', isNum(p.total) ? `${fmt(p.total)} req/s` : '–');
    setText('lat-now', isNum(p.p50) ? `p50 ${fmt(p.p50)} · p99 ${fmt(p.p99)} ms` : 'no requests');
    setText('q-now', isNum(p.qPre) || isNum(p.qExe) ? `preprocess ${p.qPre ?? '–'} · executor ${p.qExe ?? '–'}` : '–');
  }

  function windowSamples() {
    const s = state.samples;
    if (s.length < 2) return null;
    return { first: s[0], last: s[s.length - 1], dt: s[s.length - 1].t - s[0].t };
  }

  function renderTenants() {
    const w = windowSamples();
    const body = $('tenants-body');
    if (!w || w.dt <= 0) return;
    const load = tenantLoad(w.last.m, w.first.m);
    const totals = new Map();
    for (const s of series(w.last.m, 'mmgate_requests_total')) {
      const t = s.labels.tenant === undefined ? '' : s.labels.tenant;
      totals.set(t, (totals.get(t) || 0) + s.value);
    }
    const names = Array.from(totals.keys());
    if (names.length === 0) {
      fill(body, h('tr', null, h('td', { colSpan: 5, class: 'muted' }, 'no requests yet')));
      return;
    }
    const rows = names
      .map((t) => {
        const l = load.get(t) || { req: 0, err: 0 };
        return { t, rps: l.req / w.dt, eps: l.err / w.dt, rate: l.req > 0 ? l.err / l.req : null, total: totals.get(t) };
      })
      .sort((a, b) => b.rps - a.rps || a.t.localeCompare(b.t))
      .map((r) =>
        h(
          'tr',
          null,
          h('th', { scope: 'row', class: 'mono' }, r.t === '' ? '(none)' : r.t),
          h('td', { class: 'num' }, fmt(r.rps)),
          h('td', { class: 'num' }, fmt(r.eps)),
          h('td', { class: `num${isNum(r.rate) && r.rate > 0 ? ' bad' : ''}` }, fmtPct(r.rate)),
          h('td', { class: 'num' }, Math.round(r.total).toLocaleString('en-US')),
        ),
      );
    fill(body, ...rows);
  }

  function renderResources() {
    const s = state.samples;
    const last = s[s.length - 1];
    const w = windowSamples();
    const cpuNow = byLabel(last.m, 'mmgate_process_cpu_seconds_total', 'pool');
    const rss = byLabel(last.m, 'mmgate_process_resident_bytes', 'pool');
    const cpuBefore = w ? byLabel(w.first.m, 'mmgate_process_cpu_seconds_total', 'pool') : new Map();
    const pools = Array.from(new Set([...cpuNow.keys(), ...rss.keys()])).sort();
    const rows = pools.map((pool) => {
      let cpu = null;
      if (w && w.dt > 0 && cpuBefore.has(pool) && cpuNow.has(pool)) {
        const d = cpuNow.get(pool) - cpuBefore.get(pool);
        if (d >= 0) cpu = d / w.dt;
      }
      return h(
        'tr',
        null,
        h('th', { scope: 'row' }, pool),
        h('td', { class: 'num', title: 'CPU time per second, 100 % = one core' }, isNum(cpu) ? `${(cpu * 100).toFixed(0)} %` : '–'),
        h('td', { class: 'num' }, fmtBytes(rss.get(pool))),
      );
    });
    if (rows.length === 0) rows.push(h('tr', null, h('td', { colSpan: 3, class: 'muted' }, 'no process metrics')));
    fill($('res-body'), ...rows);

    const slots = new Map();
    for (const x of series(last.m, 'mmgate_shm_slots')) {
      const e = slots.get(x.labels.model) || {};
      e[x.labels.state] = (e[x.labels.state] || 0) + x.value;
      slots.set(x.labels.model, e);
    }
    const fills = new Map();
    if (w) {
      for (const part of ['sum', 'count']) {
        for (const { labels, d } of increases(w.last.m, w.first.m, `mmgate_batch_fill_ratio_${part}`)) {
          const e = fills.get(labels.model) || { sum: 0, count: 0 };
          e[part] += d;
          fills.set(labels.model, e);
        }
      }
    }
    const models = Array.from(new Set([...slots.keys(), ...fills.keys()])).filter((x) => x !== undefined).sort();
    const srows = models.map((model) => {
      const sl = slots.get(model) || {};
      const f = fills.get(model);
      const mean = f && f.count > 0 ? f.sum / f.count : null;
      return h(
        'tr',
        null,
        h('th', { scope: 'row', class: 'mono' }, model),
        h('td', { class: 'num' }, sl.free === undefined ? '–' : String(sl.free)),
        h('td', { class: 'num' }, sl.leased === undefined ? '–' : String(sl.leased)),
        h('td', { class: 'num', title: 'batch size over max_batch, last 10 s' }, fmtPct(mean)),
      );
    });
    if (srows.length === 0) srows.push(h('tr', null, h('td', { colSpan: 4, class: 'muted' }, 'no slot metrics')));
    fill($('slots-body'), ...srows);
  }

  // ----------------------------------------------------------------- charts

  function haveUPlot() {
    return typeof window.uPlot === 'function';
  }

  function axisValues(_u, vals) {
    return vals.map((v) => (v === null ? '' : fmt(v)));
  }

  function baseOpts(el, seriesDefs, timeAxis) {
    return {
      width: Math.max(200, el.clientWidth),
      height: CHART_H,
      cursor: { drag: { x: false, y: false }, points: { size: 6 } },
      legend: { show: true, live: true },
      scales: {
        x: timeAxis
          ? {
              time: true,
              range: (_u, _min, max) => {
                const hi = isNum(max) ? max : Date.now() / 1000;
                return [hi - WINDOW_S, hi];
              },
            }
          : { time: false },
        y: {
          range: (_u, _min, max) => [0, isNum(max) && max > 0 ? max * 1.15 : 1],
        },
      },
      axes: [
        {
          stroke: '#5b6472',
          font: '11px system-ui, sans-serif',
          grid: { stroke: '#eceff3', width: 1 },
          ticks: { stroke: '#d5dae1', width: 1 },
          ...(timeAxis ? {} : { values: (_u, vals) => vals.map((v) => `${v} s`) }),
        },
        {
          stroke: '#5b6472',
          font: '11px system-ui, sans-serif',
          grid: { stroke: '#eceff3', width: 1 },
          ticks: { stroke: '#d5dae1', width: 1 },
          size: 48,
          values: axisValues,
        },
      ],
      series: [
        timeAxis ? {} : { label: 't', value: (_u, v) => (v === null ? '–' : `${v.toFixed(2)} s`) },
        ...seriesDefs.map((s) => ({
          label: s.label,
          stroke: s.stroke,
          width: s.width || 1.5,
          fill: s.fill,
          dash: s.dash,
          spanGaps: false,
          points: { show: !timeAxis },
          value: s.value || ((_u, v) => (v === null || v === undefined ? '–' : fmt(v))),
        })),
      ],
    };
  }

  /** The chart `name` in element `id` with these series, made anew if they changed. */
  function chart(name, id, seriesDefs, data) {
    const el = $(id);
    const sig = JSON.stringify(seriesDefs.map((s) => [s.label, s.stroke]));
    let c = state.charts[name];
    if (c && c.sig === sig) {
      c.u.setData(data);
      return;
    }
    if (c) c.u.destroy();
    el.replaceChildren();
    const u = new window.uPlot(baseOpts(el, seriesDefs, true), data, el);
    state.charts[name] = { u, sig, el };
  }

  function renderCharts() {
    if (!haveUPlot()) {
      for (const id of ['chart-throughput', 'chart-latency', 'chart-queue']) {
        const el = $(id);
        if (!el.dataset.noLib) {
          el.dataset.noLib = '1';
          fill(el, h('p', { class: 'muted' }, 'Charts unavailable: /ui/vendor/uPlot.iife.min.js did not load.'));
        }
      }
      return;
    }
    const pts = state.points;
    const xs = pts.map((p) => p.t);

    const tenants = new Set();
    for (const p of pts) for (const [t, v] of p.tenants) if (v > 0) tenants.add(t);
    const tlist = Array.from(tenants).sort();
    const tpSeries = [{ label: 'total', stroke: TOTAL_COLOUR, width: 2, fill: 'rgba(51,65,85,0.06)' }].concat(
      tlist.map((t, i) => ({ label: t === '' ? '(none)' : t, stroke: PALETTE[i % PALETTE.length] })),
    );
    const tpData = [xs, pts.map((p) => p.total)].concat(
      tlist.map((t) => pts.map((p) => (p.total === null ? null : p.tenants.get(t) || 0))),
    );
    chart('throughput', 'chart-throughput', tpSeries, tpData);

    chart(
      'latency',
      'chart-latency',
      [
        { label: 'p50', stroke: PALETTE[0] },
        { label: 'p99', stroke: PALETTE[2] },
      ],
      [xs, pts.map((p) => p.p50), pts.map((p) => p.p99)],
    );

    chart(
      'queue',
      'chart-queue',
      [
        { label: 'preprocess queued', stroke: PALETTE[1], value: (_u, v) => (v === null || v === undefined ? '–' : String(v)) },
        { label: 'executor pending', stroke: PALETTE[3], value: (_u, v) => (v === null || v === undefined ? '–' : String(v)) },
      ],
      [xs, pts.map((p) => p.qPre), pts.map((p) => p.qExe)],
    );
  }

  let resizeTimer = null;
  function onResize() {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      const all = Object.values(state.charts);
      if (state.playChart) all.push(state.playChart);
      for (const c of all) {
        const w = Math.max(200, c.el.clientWidth);
        if (w !== c.u.width) c.u.setSize({ width: w, height: c.u.height });
      }
    }, 150);
  }

  // ------------------------------------------------------------- playground

  function renderPlayModels(models) {
    const names = models.map((m) => m.name);
    const sig = models.map((m) => `${m.name}\u0002${m.loaded}`).join('\u0001');
    if (sig === state.modelNames) return;
    state.modelNames = sig;
    const sel = $('play-model');
    const keep = sel.value;
    fill(sel, ...models.map((m) => h('option', { value: m.name }, m.loaded === false ? `${m.name} (unloaded)` : m.name)));
    if (names.includes(keep)) sel.value = keep;
    $('play-submit').disabled = names.length === 0;
  }

  /** [label, score] pairs, highest first; scores that are not numbers last. */
  function ranked(scores) {
    return Object.entries(scores || {})
      .map(([l, v]) => [l, typeof v === 'number' ? v : null])
      .sort((a, b) => {
        if (a[1] === null && b[1] === null) return a[0].localeCompare(b[0]);
        if (a[1] === null) return 1;
        if (b[1] === null) return -1;
        return b[1] - a[1];
      });
  }

  function topElement(pairs, what) {
    const top = pairs[0];
    const e = h('p', { id: 'play-top', class: 'play-top' });
    if (!top) {
      e.textContent = `No labels in the ${what}.`;
      return e;
    }
    e.dataset.label = top[0];
    e.dataset.score = top[1] === null ? 'NaN' : String(top[1]);
    e.append(h('span', { class: 'muted' }, `Top label (${what}): `), h('strong', { class: 'mono' }, top[0]), ' ', h('span', { class: 'score' }, fmtScore(top[1])));
    return e;
  }

  function scoreList(pairs) {
    const shown = pairs.slice(0, MAX_LABELS_LISTED);
    const ol = h(
      'ol',
      { class: 'scores' },
      ...shown.map(([l, v]) => {
        const pct = isNum(v) ? Math.max(0, Math.min(1, v)) * 100 : 0;
        const barFill = h('span', { class: 'bar-fill' });
        barFill.style.width = `${pct.toFixed(1)}%`;
        return h(
          'li',
          null,
          h('span', { class: 'label mono' }, l),
          h('span', { class: 'bar', 'aria-hidden': 'true' }, barFill),
          h('span', { class: 'val mono', title: v === null ? 'not a number' : String(v) }, fmtScore(v)),
        );
      }),
    );
    const more = pairs.length > shown.length ? h('p', { class: 'muted' }, `and ${pairs.length - shown.length} more labels`) : null;
    return [ol, more];
  }

  function timingsBlock(t) {
    if (!t) return null;
    const items = [
      ['total', t.total_ms],
      ['queue', t.queue_ms],
      ['decode', t.decode_ms],
      ['batch wait', t.batch_wait_ms],
      ['inference', t.inference_ms],
    ];
    return h(
      'dl',
      { class: 'timings' },
      ...items.map(([k, v], i) =>
        h('div', { class: i === 0 ? 'total' : '' }, h('dt', null, k), h('dd', i === 0 ? { id: 'play-total-ms' } : null, isNum(v) ? `${v.toFixed(2)} ms` : '–')),
      ),
    );
  }

  function destroyPlayChart() {
    if (state.playChart) {
      state.playChart.u.destroy();
      state.playChart = null;
    }
  }

  function renderImageResult(res, file) {
    const results = res.results || [];
    const first = results[0] || {};
    const pairs = ranked(first.scores);
    const parts = [
      topElement(pairs, results.length > 1 ? 'first image' : 'image'),
      h(
        'p',
        { class: 'meta muted' },
        [res.model, first.format, first.width && first.height ? `${first.width}×${first.height}` : null, file.name, res.request_id ? `request ${res.request_id}` : null]
          .filter(Boolean)
          .join(' · '),
      ),
      timingsBlock(res.timings),
      ...scoreList(pairs),
    ];
    for (const r of results.slice(1)) {
      parts.push(h('h3', null, `Image ${r.index}${r.name ? ` (${r.name})` : ''}`), ...scoreList(ranked(r.scores)));
    }
    fill($('play-result'), ...parts);
  }

  function renderVideoResult(res, file) {
    const agg = res.aggregate || {};
    const maxPairs = ranked(agg.max);
    const frames = (res.frames || []).slice().sort((a, b) => a.t - b.t);
    const meta = [
      res.model,
      res.codec,
      res.width && res.height ? `${res.width}×${res.height}` : null,
      isNum(res.duration) ? `${res.duration.toFixed(2)} s` : null,
      `${res.frames_sampled ?? frames.length} frames sampled of ${res.frames_decoded ?? '?'} decoded`,
      res.truncated ? 'truncated' : null,
      res.complete === false ? 'incomplete' : null,
      file.name,
    ]
      .filter(Boolean)
      .join(' · ');
    const timeline = h('div', { id: 'play-timeline', class: 'chart', role: 'img', 'aria-label': 'Score of each label over the video time' });
    const aggRows = maxPairs.slice(0, MAX_LABELS_LISTED).map(([l, v]) => {
      const mean = agg.mean ? agg.mean[l] : null;
      const above = agg.above && Array.isArray(agg.above[l]) ? agg.above[l].length : null;
      return h(
        'tr',
        null,
        h('th', { scope: 'row', class: 'mono' }, l),
        h('td', { class: 'num mono' }, fmtScore(v)),
        h('td', { class: 'num mono' }, fmtScore(typeof mean === 'number' ? mean : null)),
        h('td', { class: 'num' }, above === null ? '–' : String(above)),
      );
    });
    const aggTable = h(
      'table',
      { class: 'data' },
      h('caption', null, 'Aggregate over frames'),
      h(
        'thead',
        null,
        h(
          'tr',
          null,
          h('th', { scope: 'col' }, 'label'),
          h('th', { scope: 'col', class: 'num' }, 'max'),
          h('th', { scope: 'col', class: 'num' }, 'mean'),
          h('th', { scope: 'col', class: 'num' }, isNum(agg.threshold) ? `frames ≥ ${agg.threshold}` : 'frames above'),
        ),
      ),
      h('tbody', null, ...aggRows),
    );
    const degraded = res.degraded
      ? h('p', { class: 'warn-text' }, `Degraded under load (${res.degraded.reason}): sampling ${res.degraded.sampling}, queue delay ${res.degraded.queue_delay_ms} ms.`)
      : null;
    fill($('play-result'),
      topElement(maxPairs, 'video max'),
      h('p', { class: 'meta muted' }, meta),
      degraded,
      timingsBlock(res.timings),
      timeline,
      h('div', { class: 'table-wrap' }, aggTable),
    );

    if (!haveUPlot()) {
      timeline.append(h('p', { class: 'muted' }, 'Timeline unavailable: uPlot did not load.'));
      return;
    }
    if (frames.length === 0) {
      timeline.append(h('p', { class: 'muted' }, 'No frames were scored.'));
      return;
    }
    const labels = maxPairs.slice(0, MAX_TIMELINE_LABELS).map((p) => p[0]);
    const data = [frames.map((f) => f.t)].concat(
      labels.map((l) => frames.map((f) => (f.scores && typeof f.scores[l] === 'number' ? f.scores[l] : null))),
    );
    const defs = labels.map((l, i) => ({ label: l, stroke: PALETTE[i % PALETTE.length], value: (_u, v) => fmtScore(v) }));
    const opts = baseOpts(timeline, defs, false);
    opts.scales.y.range = (_u, _min, max) => [0, isNum(max) && max > 1 ? max * 1.05 : 1];
    state.playChart = { u: new window.uPlot(opts, data, timeline), el: timeline };
  }

  function playError(error, status) {
    const r = $('play-result');
    r.dataset.error = error.code;
    fill(r,
      h(
        'p',
        { class: 'error-box', role: 'alert' },
        h('strong', null, 'Refused'),
        status ? ` (HTTP ${status})` : '',
        ': ',
        h('code', { class: 'err-code' }, error.code),
        ' ',
        error.message,
      ),
    );
  }

  async function playSubmit(ev) {
    ev.preventDefault();
    const model = $('play-model').value;
    const file = $('play-file').files[0];
    destroyPlayChart();
    const r = $('play-result');
    delete r.dataset.error;
    if (!model) {
      playError({ code: 'no_model', message: 'no model to score with: the executor lists none' });
      return;
    }
    if (!file) {
      playError({ code: 'no_file', message: 'choose an image or a video file first' });
      return;
    }
    const btn = $('play-submit');
    btn.disabled = true;
    r.setAttribute('aria-busy', 'true');
    fill(r, h('p', { class: 'muted' }, `Scoring ${file.name} (${fmtBytes(file.size)}) with ${model}…`));
    try {
      const res = await api('POST', `/admin/models/${encodeURIComponent(model)}/score`, {
        body: file,
        contentType: file.type || 'application/octet-stream',
        timeoutMs: 180000,
      });
      if (!res.ok) {
        playError(res.error, res.status);
        return;
      }
      if (!res.data || typeof res.data !== 'object') {
        playError({ code: 'bad_answer', message: 'the gateway answered something that is not JSON' }, res.status);
        return;
      }
      if (Array.isArray(res.data.frames)) renderVideoResult(res.data, file);
      else renderImageResult(res.data, file);
    } catch (e) {
      playError({ code: 'dashboard_error', message: String(e && e.message ? e.message : e) });
    } finally {
      r.removeAttribute('aria-busy');
      btn.disabled = state.modelNames === '';
    }
  }

  // ------------------------------------------------------------------ start

  function start() {
    showKeyNote();
    $('admin-key-form').addEventListener('submit', saveKey);
    $('admin-key-clear').addEventListener('click', clearKey);

    const wi = $('workers-input');
    wi.addEventListener('input', () => {
      wi.dataset.dirty = '1';
    });
    wi.addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter') {
        ev.preventDefault();
        resizeWorkers(parseCount(wi.value));
      }
    });
    $('workers-apply').addEventListener('click', () => resizeWorkers(parseCount(wi.value)));
    $('workers-minus').addEventListener('click', () => {
      if (state.pools) resizeWorkers(state.pools.preprocess.desired - 1);
    });
    $('workers-plus').addEventListener('click', () => {
      if (state.pools) resizeWorkers(state.pools.preprocess.desired + 1);
    });

    $('play-form').addEventListener('submit', playSubmit);
    window.addEventListener('resize', onResize);
    poll();
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();

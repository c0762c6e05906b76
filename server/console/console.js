// tidewatch console: the live anomaly feed (GET /anomalies, Server-Sent Events), a
// device search (GET /devices) and a chart of one device's recent values with the
// rolling mean, the anomaly band and the anomalies (GET /window plus the feed).
// Plain DOM and canvas; it talks to the gateway that served it and nothing else.
"use strict";

const FEED_ITEMS = 200; // feed entries kept on the page
const MAX_POINTS = 600; // chart points kept per metric
const POLL_MS = 1000; // how often the selected device's window is read
const PAGE = 20; // device ids per search page

const $ = (id) => document.getElementById(id);

// ---- the live feed ----

let source = null;

function feedUrl() {
  const params = new URLSearchParams();
  for (const d of splitList($("feed-devices").value)) params.append("device_id", d);
  for (const m of splitList($("feed-metrics").value)) params.append("metric", m);
  const query = params.toString();
  return "../anomalies" + (query ? "?" + query : "");
}

function splitList(text) {
  return text.split(",").map((s) => s.trim()).filter((s) => s.length > 0);
}

function setStatus(state, text) {
  const el = $("feed-status");
  el.dataset.state = state;
  el.textContent = text;
}

// The browser reconnects by itself and sends Last-Event-ID, so the server replays
// what was missed in between.
function connectFeed() {
  if (source) source.close();
  source = new EventSource(feedUrl());
  setStatus("connecting", "connecting");
  source.onopen = () => setStatus("open", "live");
  source.onerror = () => setStatus("error", "reconnecting");
  source.addEventListener("anomaly", (e) => {
    let event;
    try {
      event = JSON.parse(e.data);
    } catch {
      return;
    }
    addFeedItem(e.lastEventId, event);
    chart.onAnomaly(event);
  });
  source.addEventListener("error", (e) => {
    if (e.data) setStatus("error", "server shutting down");
  });
}

function addFeedItem(id, event) {
  const list = $("feed-list");
  const verdict = event.verdict || {};
  if (Number(event.missed || 0) > 0) {
    const missed = document.createElement("li");
    missed.className = "missed";
    missed.textContent = `${event.missed} anomalies missed (the feed fell behind)`;
    list.prepend(missed);
  }
  const item = document.createElement("li");
  item.dataset.eventId = id;
  item.dataset.device = verdict.deviceId || "";
  const when = document.createElement("div");
  when.className = "when";
  when.textContent = `#${id} · ${formatTime(event.time)}`;
  const device = document.createElement("div");
  device.className = "device";
  device.textContent = verdict.deviceId || "";
  item.append(when, device);
  for (const m of verdict.metrics || []) {
    if (!m.anomaly) continue;
    const line = document.createElement("span");
    line.className = "metric";
    line.textContent = `${m.metric} = ${fmt(m.value)} (z ${fmt(m.zScore)}, mean ${fmt(m.mean)})`;
    item.append(line);
  }
  item.addEventListener("click", () => selectDevice(verdict.deviceId));
  list.prepend(item);
  while (list.children.length > FEED_ITEMS) list.lastElementChild.remove();
}

function formatTime(rfc3339) {
  const d = new Date(rfc3339);
  return isNaN(d) ? String(rfc3339 || "") : d.toLocaleTimeString();
}

function fmt(x) {
  const n = Number(x);
  if (!Number.isFinite(n)) return String(x);
  return Math.abs(n) >= 1e5 || (n !== 0 && Math.abs(n) < 1e-3) ? n.toExponential(3) : n.toFixed(2);
}

// ---- device search ----

let searchPrefix = "";

async function search(prefix, after) {
  const params = new URLSearchParams({ prefix, limit: String(PAGE) });
  if (after) params.set("after", after);
  const response = await fetch("../devices?" + params);
  if (!response.ok) {
    $("device-hint").textContent = `search failed: ${response.status}`;
    return;
  }
  const page = await response.json();
  const list = $("device-list");
  if (!after) list.replaceChildren();
  for (const id of page.deviceIds) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = id;
    button.title = id;
    button.dataset.device = id;
    button.setAttribute("aria-pressed", String(id === chart.device));
    button.addEventListener("click", () => selectDevice(id));
    li.append(button);
    list.append(li);
  }
  const more = $("device-more");
  more.hidden = !page.next;
  more.dataset.after = page.next || "";
  $("device-hint").textContent =
    list.children.length === 0 ? "no device in memory with that prefix" : "";
}

function selectDevice(id) {
  if (!id) return;
  for (const b of document.querySelectorAll("#device-list button")) {
    b.setAttribute("aria-pressed", String(b.dataset.device === id));
  }
  chart.select(id);
}

// ---- the chart ----

// Mean and population standard deviation of the last `window` values before index i.
function trailing(values, i, window) {
  const from = Math.max(0, i - window);
  const n = i - from;
  if (n === 0) return { mean: NaN, sd: NaN, n };
  let sum = 0;
  for (let k = from; k < i; k++) sum += values[k];
  const mean = sum / n;
  let sq = 0;
  for (let k = from; k < i; k++) sq += (values[k] - mean) ** 2;
  return { mean, sd: Math.sqrt(sq / n), n };
}

const chart = {
  device: null,
  metric: null,
  doc: null, // the last GET /window document
  series: new Map(), // metric -> [{v, mean, sd, n, alert}]
  timer: null,
  generation: 0,

  select(id) {
    this.device = id;
    this.metric = null;
    this.doc = null;
    this.series = new Map();
    this.generation++;
    $("device-title").textContent = id;
    clearInterval(this.timer);
    this.timer = setInterval(() => this.refresh(), POLL_MS);
    this.refresh();
  },

  async refresh() {
    if (!this.device) return;
    const generation = this.generation;
    let doc;
    try {
      const response = await fetch("../window?" + new URLSearchParams({ device_id: this.device }));
      if (!response.ok) return;
      doc = await response.json();
    } catch {
      return;
    }
    if (generation !== this.generation) return;
    this.merge(doc);
    this.draw();
  },

  // Appends the values that are new since the last document; a window that does not
  // continue the previous one starts the series over.
  merge(doc) {
    const previous = this.doc;
    const changed =
      !previous || previous.updatedAt !== doc.updatedAt || previous.lastSeq !== doc.lastSeq;
    this.doc = doc;
    if (!changed) return;
    const width = doc.windowSize;
    for (const m of doc.metrics) {
      const values = m.values.map(Number);
      const before = previous && previous.metrics.find((p) => p.metric === m.metric);
      const old = before ? before.values.map(Number) : null;
      let series = this.series.get(m.metric);
      const added = series && old ? appended(old, values) : -1;
      if (added < 0) {
        series = [];
        for (let i = 0; i < values.length; i++) series.push(this.point(values.slice(0, i), values[i], doc));
      } else {
        for (const v of values.slice(values.length - added)) {
          series.push(this.point(series.slice(-width).map((p) => p.v), v, doc));
        }
      }
      while (series.length > MAX_POINTS) series.shift();
      this.series.set(m.metric, series);
    }
    if (!this.metric || !this.series.has(this.metric)) {
      this.metric = doc.metrics.length ? doc.metrics[0].metric : null;
    }
    this.tabs();
  },

  // A point judged against the values before it, as the z-score detector does.
  point(before, v, doc) {
    const { mean, sd, n } = trailing(before, before.length, doc.windowSize);
    const judged = n >= doc.minSamples && Number.isFinite(sd);
    const alert = judged && (sd > 0 ? Math.abs(v - mean) / sd > doc.threshold : v !== mean);
    return { v, mean, sd, n, alert };
  },

  // An anomaly from the feed: its verdict carries the exact mean and stddev.
  onAnomaly(event) {
    const verdict = event.verdict || {};
    if (verdict.deviceId !== this.device) return;
    for (const m of verdict.metrics || []) {
      if (!m.anomaly) continue;
      const series = this.series.get(m.metric);
      const value = Number(m.value);
      const point = series && [...series].reverse().find((p) => p.v === value);
      if (point) {
        point.alert = true;
        point.mean = Number(m.mean);
        point.sd = Number(m.stddev);
      }
    }
    this.draw();
    this.refresh();
  },

  tabs() {
    const tabs = $("metric-tabs");
    const names = this.doc ? this.doc.metrics.map((m) => m.metric) : [];
    if (tabs.dataset.names !== names.join("\n")) {
      tabs.dataset.names = names.join("\n");
      tabs.replaceChildren();
      for (const name of names) {
        const b = document.createElement("button");
        b.type = "button";
        b.setAttribute("role", "tab");
        b.textContent = name;
        b.addEventListener("click", () => {
          this.metric = name;
          this.tabs();
          this.draw();
        });
        tabs.append(b);
      }
    }
    for (const b of tabs.children) b.setAttribute("aria-selected", String(b.textContent === this.metric));
  },

  draw() {
    const canvas = $("chart");
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, width, height);
    const series = (this.metric && this.series.get(this.metric)) || [];
    canvas.dataset.points = String(series.length);
    canvas.dataset.alerts = String(series.filter((p) => p.alert).length);
    canvas.dataset.metric = this.metric || "";
    this.stats(series);
    const css = getComputedStyle(document.documentElement);
    const color = (name) => css.getPropertyValue(name).trim();
    g.font = "12px system-ui, sans-serif";
    g.fillStyle = color("--dim");
    if (series.length === 0) {
      g.fillText(this.device ? "waiting for values" : "select a device", 16, 24);
      return;
    }
    const thr = this.doc.threshold;
    let lo = Infinity;
    let hi = -Infinity;
    for (const p of series) {
      lo = Math.min(lo, p.v);
      hi = Math.max(hi, p.v);
      if (Number.isFinite(p.sd)) {
        lo = Math.min(lo, p.mean - thr * p.sd);
        hi = Math.max(hi, p.mean + thr * p.sd);
      }
    }
    if (hi === lo) {
      hi += 1;
      lo -= 1;
    }
    const pad = { l: 58, r: 12, t: 12, b: 22 };
    const x = (i) => pad.l + (series.length === 1 ? 0 : (i / (series.length - 1)) * (width - pad.l - pad.r));
    const y = (v) => pad.t + (1 - (v - lo) / (hi - lo)) * (height - pad.t - pad.b);

    // Axes: min, middle and max labels with grid lines.
    g.strokeStyle = color("--line");
    g.lineWidth = 1;
    for (const v of [lo, (lo + hi) / 2, hi]) {
      g.beginPath();
      g.moveTo(pad.l, y(v));
      g.lineTo(width - pad.r, y(v));
      g.stroke();
      g.fillText(fmt(v), 4, y(v) + 4);
    }
    g.fillText(`${series.length} values, newest right`, pad.l, height - 6);

    // The band, where the points have one.
    const banded = series.map((p, i) => ({ p, i })).filter(({ p }) => p.n >= this.doc.minSamples && Number.isFinite(p.sd));
    if (banded.length > 1) {
      g.fillStyle = color("--band");
      g.beginPath();
      banded.forEach(({ p, i }, k) => (k ? g.lineTo(x(i), y(p.mean + thr * p.sd)) : g.moveTo(x(i), y(p.mean + thr * p.sd))));
      for (const { p, i } of [...banded].reverse()) g.lineTo(x(i), y(p.mean - thr * p.sd));
      g.closePath();
      g.fill();
      g.strokeStyle = color("--mean");
      g.lineWidth = 1.5;
      g.beginPath();
      banded.forEach(({ p, i }, k) => (k ? g.lineTo(x(i), y(p.mean)) : g.moveTo(x(i), y(p.mean))));
      g.stroke();
    }

    // The values.
    g.strokeStyle = color("--value");
    g.lineWidth = 1.5;
    g.beginPath();
    series.forEach((p, i) => (i ? g.lineTo(x(i), y(p.v)) : g.moveTo(x(i), y(p.v))));
    g.stroke();

    // The anomalies.
    g.fillStyle = color("--alert");
    for (let i = 0; i < series.length; i++) {
      if (!series[i].alert) continue;
      g.beginPath();
      g.arc(x(i), y(series[i].v), 5, 0, 2 * Math.PI);
      g.fill();
    }
  },

  stats(series) {
    const dl = $("stats");
    dl.replaceChildren();
    const m = this.doc && this.doc.metrics.find((x) => x.metric === this.metric);
    if (!m) return;
    const rows = [
      ["last value", fmt(m.values[m.values.length - 1])],
      ["rolling mean", fmt(m.mean)],
      ["stddev", fmt(m.stddev)],
      ["band", `${fmt(m.mean - this.doc.threshold * m.stddev)} … ${fmt(m.mean + this.doc.threshold * m.stddev)}`],
      ["threshold", fmt(this.doc.threshold)],
      ["last seq", this.doc.lastSeq],
      ["anomalies seen", String(series.filter((p) => p.alert).length)],
      ["updated", formatTime(this.doc.updatedAt)],
    ];
    for (const [k, v] of rows) {
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = v;
      dl.append(dt, dd);
    }
  },
};

// How many values were appended to window `old` to give window `now` (which drops
// as many from its front once full), or -1 when `now` does not continue `old`.
function appended(old, now) {
  for (let added = 0; added <= now.length; added++) {
    const kept = now.length - added;
    if (kept > old.length) continue;
    let same = true;
    for (let k = 0; k < kept && same; k++) same = now[k] === old[old.length - kept + k];
    if (same) return added;
  }
  return -1;
}

// ---- start ----

document.addEventListener("DOMContentLoaded", () => {
  $("search").addEventListener("submit", (e) => {
    e.preventDefault();
    searchPrefix = $("search-prefix").value.trim();
    search(searchPrefix, "");
  });
  $("device-more").addEventListener("click", (e) => search(searchPrefix, e.target.dataset.after));
  $("feed-filter").addEventListener("submit", (e) => {
    e.preventDefault();
    connectFeed();
  });
  window.addEventListener("resize", () => chart.draw());
  const wanted = new URLSearchParams(location.search).get("device");
  if (wanted) {
    $("search-prefix").value = wanted;
    searchPrefix = wanted;
  }
  search(searchPrefix, "");
  if (wanted) selectDevice(wanted);
  connectFeed();
  chart.draw();
});

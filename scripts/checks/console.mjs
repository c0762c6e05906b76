// End-to-end test of the web console in real headless Chromium (Debian's chromium,
// driven by playwright-core): against a running server at argv[2], ingest a seeded
// series, open /console/, find the device, watch its chart grow, send an anomaly, and
// see it arrive in the live feed and on the chart. Saves a screenshot to argv[3].
// Fails on any page error, console error, or request to another origin.
import { chromium } from "playwright-core";

const [base, screenshot] = process.argv.slice(2);
if (!base || !screenshot) {
  console.error("usage: node console.mjs http://HOST:PORT out.png");
  process.exit(2);
}
const DEVICE = "pump-7";
const TIMEOUT = 15_000;

// A seeded series: values around 50 (uniform noise of ±2) from a small LCG, so every
// run draws the same picture.
let state = 20261207;
function noise() {
  state = (Math.imul(state, 1103515245) + 12345) >>> 0;
  return (state / 2 ** 32) * 4 - 2;
}
let seq = 0;

async function ingest(device, values, firstSeq) {
  const samples = values.map((v, i) => ({ deviceId: device, seq: String(firstSeq + i), metrics: { rps: v } }));
  const response = await fetch(`${base}/ingest`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ samples }),
  });
  if (response.status !== 200) throw new Error(`ingest: ${response.status} ${await response.text()}`);
  const { verdicts } = await response.json();
  return verdicts;
}

async function normal(count) {
  const values = Array.from({ length: count }, () => 50 + noise());
  const verdicts = await ingest(DEVICE, values, seq + 1);
  seq += count;
  const surprising = verdicts.filter((v) => v.anomaly);
  if (surprising.length) throw new Error(`the seeded series has anomalies: ${JSON.stringify(surprising)}`);
}

function step(text) {
  console.log(`console: ${text}`);
}

const problems = [];
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
try {
  step("seeding devices");
  await ingest("pump-3", [10, 11, 12], 1);
  await ingest("fan-1", [1, 2, 3], 1);
  await normal(60);

  const page = await browser.newPage({ viewport: { width: 1440, height: 820 } });
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console error: ${m.text()}`);
  });
  page.on("request", (r) => {
    if (!r.url().startsWith(base) && !r.url().startsWith("data:")) problems.push(`request to another origin: ${r.url()}`);
  });

  step("opening the console");
  await page.goto(`${base}/console/`);
  await page.waitForSelector('#feed-status[data-state="open"]', { timeout: TIMEOUT });

  step("searching for the device");
  await page.fill("#search-prefix", "pump");
  await page.click('#search button[type="submit"]');
  await page.waitForSelector(`#device-list button[data-device="${DEVICE}"]`, { timeout: TIMEOUT });
  const listed = await page.$$eval("#device-list button", (bs) => bs.map((b) => b.dataset.device));
  if (listed.join(",") !== "pump-3,pump-7") throw new Error(`search for "pump" listed ${listed}`);
  await page.click(`#device-list button[data-device="${DEVICE}"]`);

  step("the chart shows the window");
  await page.waitForFunction(() => Number(document.getElementById("chart").dataset.points) >= 50, null, {
    timeout: TIMEOUT,
  });

  step("the chart grows live");
  for (let i = 0; i < 6; i++) {
    await normal(3);
    await page.waitForTimeout(250);
  }
  await page.waitForFunction(() => Number(document.getElementById("chart").dataset.points) >= 68, null, {
    timeout: TIMEOUT,
  });
  const before = await page.$eval("#chart", (c) => Number(c.dataset.alerts));
  if (before !== 0) throw new Error(`${before} anomalies on the chart before the spike`);

  step("an anomaly arrives in the feed and on the chart");
  seq += 1;
  const [spike] = await ingest(DEVICE, [95], seq);
  if (!spike.anomaly) throw new Error(`the spike was not an anomaly: ${JSON.stringify(spike)}`);
  const item = await page.waitForSelector(`#feed-list li[data-device="${DEVICE}"]`, { timeout: TIMEOUT });
  const text = await item.textContent();
  if (!text.includes("rps = 95.00")) throw new Error(`feed item reads "${text}"`);
  await page.waitForFunction(() => Number(document.getElementById("chart").dataset.alerts) === 1, null, {
    timeout: TIMEOUT,
  });
  for (let i = 0; i < 4; i++) {
    await normal(2);
    await page.waitForTimeout(200);
  }
  await page.waitForFunction(() => Number(document.getElementById("chart").dataset.points) >= 77, null, {
    timeout: TIMEOUT,
  });
  await page.waitForTimeout(300);
  await page.screenshot({ path: screenshot });
  step(`screenshot saved to ${screenshot}`);
} finally {
  await browser.close();
}
if (problems.length) {
  console.error(problems.join("\n"));
  process.exit(1);
}
step("the console shows the live feed, the device search and the chart");

// Dashboard check in headless Chromium:
//   node dashboard.mjs ADMIN_URL SESSION_ID SHOTS_DIR PAGE_URL OTHER_CLIENT
// PAGE_URL is the link `tether dashboard` prints (the admin token in its fragment).
// Opens the dashboard while a client holds sessions and calls tools, and checks what an
// operator relies on: session rows that stay put between refreshes, filters and id search,
// charts with axes and a tooltip, a latency chart, per-tool and per-upstream panels, the
// session's detail with its timeline, eviction, the closed-session browser, a 400 px wide
// layout without horizontal scrolling, and dark mode. Saves screenshots into SHOTS_DIR and
// prints one JSON line with what it saw. Exits non-zero on any failure.
import { chromium } from "playwright-core";

const [admin, sessionId, shots, pageUrl, otherClient] = process.argv.slice(2);
if (!admin || !sessionId || !shots || !pageUrl || !otherClient) {
  console.error("usage: node dashboard.mjs ADMIN_URL SESSION_ID SHOTS_DIR PAGE_URL OTHER_CLIENT");
  process.exit(2);
}
const check = (cond, what) => {
  if (!cond) throw new Error("dashboard check failed: " + what);
};
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  const failed = [];
  page.on("requestfailed", (r) => failed.push(r.url()));
  page.on("response", (r) => { if (r.status() >= 400) failed.push(r.status() + " " + r.url()); });
  await page.goto(pageUrl);
  const row = page.locator(`#sessions tbody tr[data-id="${sessionId}"]`);
  await row.waitFor({ timeout: 15000 });
  const rows = await page.locator("#sessions tbody tr[data-id]").count();

  // Rows stay the same DOM nodes, in the same order, across refreshes (every 2 s).
  const before = await page.evaluate(() => {
    const trs = [...document.querySelectorAll("#sessions tbody tr[data-id]")];
    trs.forEach((tr) => (tr.__mark = true));
    return trs.map((tr) => tr.dataset.id);
  });
  await page.waitForTimeout(4500);
  const after = await page.evaluate(() => {
    const trs = [...document.querySelectorAll("#sessions tbody tr[data-id]")];
    return { ids: trs.map((tr) => tr.dataset.id), kept: trs.every((tr) => tr.__mark === true) };
  });
  const stable = after.kept && JSON.stringify(after.ids) === JSON.stringify(before);
  check(stable, `rows moved or were rebuilt: ${JSON.stringify(before)} -> ${JSON.stringify(after)}`);

  // Charts: axes with labels, a polyline with a non-zero point, a tooltip on hover.
  await page.waitForFunction(() => {
    const line = document.querySelector("#chart-calls polyline");
    return line && line.getAttribute("points").split(" ").some((p) => Number(p.split(",")[1]) < 120);
  }, null, { timeout: 15000 });
  const axes = await page.evaluate(() => ({
    y: document.querySelectorAll("#chart-calls text.axis.y").length,
    x: [...document.querySelectorAll("#chart-calls text.axis.x")].map((t) => t.textContent),
    latencyLines: document.querySelectorAll("#chart-latency path").length,
  }));
  check(axes.y >= 3 && axes.x.length >= 2 && axes.x.every((t) => /\d/.test(t)), "chart axes: " + JSON.stringify(axes));
  check(axes.latencyLines === 2, "latency chart has p50 and p95");
  await page.locator("#chart-calls rect.hit").last().hover();
  await page.locator("#tip").waitFor({ state: "visible", timeout: 5000 });
  const tooltip = await page.locator("#tip").innerText();
  check(/calls \d/.test(tooltip), "tooltip: " + tooltip);
  const perTool = await page.locator("#per-tool tbody tr").allInnerTexts();
  const perUpstream = await page.locator("#per-upstream tbody tr").allInnerTexts();
  check(perTool.some((t) => t.includes("echo")) && perTool.some((t) => t.includes("add")), "per-tool: " + perTool);
  check(perUpstream.some((t) => t.includes("demo")), "per-upstream: " + perUpstream);
  const servers = await page.locator("#servers tbody tr").allInnerTexts();
  check(servers.length === 1 && servers[0].includes("demo") && servers[0].includes("serving"), "servers: " + servers);
  const stateless = await page.locator("#stateless tbody tr").allInnerTexts();
  check(stateless.some((t) => t.includes("modern-dash")), "stateless clients: " + stateless);
  const tasks = await page.locator("#tasks tbody tr").allInnerTexts();
  check(tasks.some((t) => t.includes("echo") && t.includes("2025-11-25")), "tasks: " + tasks);
  const pooled = await page.locator("#sessions tbody tr[data-id]", { hasText: "pooled" }).count();
  check(pooled === 1, "the bridge's pooled upstream is marked: " + pooled);

  // Filters: by client, by id prefix; then back to everything.
  await page.selectOption("#f-client", otherClient);
  const byClient = await page.locator("#sessions tbody tr[data-id]").count();
  await page.selectOption("#f-client", "");
  await page.fill("#f-id", sessionId.slice(0, 8));
  const byId = await page.locator("#sessions tbody tr[data-id]").allInnerTexts();
  await page.fill("#f-id", "");
  check(byClient === 1 && byId.length === 1, `filters: client ${byClient}, id ${byId.length}`);
  await page.locator('#sessions th[data-sort="tool_calls"]').click();
  await page.locator('#sessions th[data-sort="tool_calls"]').click();
  const firstByCalls = await page.locator("#sessions tbody tr[data-id]").first().getAttribute("data-id");

  // Detail with its timeline.
  await row.click();
  await page.locator("#detail.open").waitFor({ timeout: 10000 });
  await page.locator("#d-calls tbody tr").first().waitFor();
  const calls = await page.locator("#d-calls tbody tr").count();
  const detailText = await page.locator("#d-kv").innerText();
  const timeline = await page.locator("#d-timeline li").evaluateAll((lis) => lis.map((li) => li.className));
  check(timeline[0] === "created" && timeline.filter((c) => c.startsWith("tool_call")).length >= 5, "timeline: " + timeline);
  await page.screenshot({ path: `${shots}/dashboard.png`, fullPage: true });

  // Evict; the session shows up among the closed ones.
  await page.locator("#evict").click();
  await row.waitFor({ state: "detached", timeout: 10000 });
  const reasons = await page.locator("#reasons").innerText();
  await page.locator(`#closed tbody tr[data-id="${sessionId}"]`).waitFor({ timeout: 10000 });
  const closedRows = await page.locator("#closed tbody tr[data-id]").count();

  // 400 px wide: nothing scrolls sideways but the tables' own boxes.
  await page.setViewportSize({ width: 400, height: 900 });
  await page.waitForTimeout(500);
  const chartWidth = await page.evaluate(() => document.querySelector("#chart-calls").viewBox.baseVal.width);
  check(chartWidth < 400, "charts redrawn for the narrow width: " + chartWidth);
  const narrow = await page.evaluate(() => document.documentElement.scrollWidth);
  check(narrow <= 400, "page is " + narrow + " px wide at a 400 px viewport");
  await page.screenshot({ path: `${shots}/dashboard-narrow.png`, fullPage: true });

  // Dark mode follows the system.
  const light = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
  await page.emulateMedia({ colorScheme: "dark" });
  const dark = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
  check(light !== dark, `dark mode: ${light} vs ${dark}`);
  await page.setViewportSize({ width: 1400, height: 1000 });
  await page.waitForTimeout(500);
  await page.screenshot({ path: `${shots}/dashboard-dark.png`, fullPage: true });
  const favicon = await page.locator('link[rel="icon"]').getAttribute("href");
  check(favicon && favicon.startsWith("data:image/svg+xml"), "favicon");

  console.log(JSON.stringify({ ok: true, rows, stable, axes, tooltip, perTool, perUpstream, stateless, tasks, byClient, byId: byId.length,
    firstByCalls, calls, detailText, timeline, reasons, closedRows, narrow, light, dark, failed }));
} finally {
  await browser.close();
}

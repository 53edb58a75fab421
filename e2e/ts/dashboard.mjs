// Dashboard check in headless Chromium:
//   node dashboard.mjs ADMIN_URL SESSION_ID SCREENSHOT [PAGE_URL]
// PAGE_URL is the link `tether dashboard` prints (the admin token in its fragment).
// Opens the dashboard while a client holds sessions and calls tools, checks that the
// session rows and a chart render, opens the session's detail, evicts it, saves a
// screenshot, and prints one JSON line with what it saw. Exits non-zero on any failure.
import { chromium } from "playwright-core";

const [admin, sessionId, screenshot, pageUrl] = process.argv.slice(2);
if (!admin || !sessionId || !screenshot) {
  console.error("usage: node dashboard.mjs ADMIN_URL SESSION_ID SCREENSHOT");
  process.exit(2);
}
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  const failed = [];
  page.on("requestfailed", (r) => failed.push(r.url()));
  await page.goto(pageUrl || admin + "/");
  const row = page.locator(`#sessions tbody tr[data-id="${sessionId}"]`);
  await row.waitFor({ timeout: 15000 });
  const rows = await page.locator("#sessions tbody tr[data-id]").count();
  // The chart has a line once the stats arrived, with a non-zero point for the calls made.
  await page.waitForFunction(() => {
    const line = document.querySelector("#chart-calls polyline");
    return line && line.getAttribute("points").split(" ").some((p) => Number(p.split(",")[1]) < 115);
  }, null, { timeout: 15000 });
  const perClient = await page.locator("#per-client tbody tr").count();
  await row.click();
  await page.locator("#detail.open").waitFor({ timeout: 10000 });
  await page.locator("#d-calls tbody tr").first().waitFor();
  const calls = await page.locator("#d-calls tbody tr").count();
  const detailText = await page.locator("#d-kv").innerText();
  await page.screenshot({ path: screenshot, fullPage: true });
  await page.locator("#evict").click();
  await row.waitFor({ state: "detached", timeout: 10000 });
  const reasons = await page.locator("#reasons").innerText();
  console.log(JSON.stringify({ ok: true, rows, perClient, calls, detailText, reasons, failed }));
} finally {
  await browser.close();
}

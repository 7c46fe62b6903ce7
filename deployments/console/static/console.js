// tokenmart console: charts, htmx CSRF header, form confirmations and copy buttons.
// Plain ES2020 with no build step. Loaded after vendor/htmx.min.js and vendor/chart.umd.min.js;
// the pages' Content-Security-Policy allows no inline script, so all behaviour hangs off data-*
// attributes here.
(function () {
  "use strict";

  const PALETTE = ["#2563eb", "#16a34a", "#d97706", "#dc2626", "#7c3aed", "#0891b2", "#db2777", "#4b5563"];

  if (window.htmx) {
    // htmx would add a <style> for its indicators (refused by style-src 'self'; console.css has
    // the rules) and evaluates hx-on/js: code with Function (refused by script-src 'self').
    window.htmx.config.includeIndicatorStyles = false;
    window.htmx.config.allowEval = false;
  }

  function formatter(unit) {
    if (unit === "USD") {
      const usd = new Intl.NumberFormat("en-US", {
        style: "currency", currency: "USD", minimumFractionDigits: 2, maximumFractionDigits: 6,
      });
      return (v) => usd.format(v);
    }
    const plain = new Intl.NumberFormat("en-US", { maximumFractionDigits: 2 });
    return unit ? (v) => plain.format(v) + " " + unit : (v) => plain.format(v);
  }

  function chartConfig(canvas) {
    const kind = canvas.dataset.kind || "bar";
    if (!["bar", "line", "stacked-bar"].includes(kind)) throw new Error("unknown data-kind " + kind);
    const labels = JSON.parse(canvas.dataset.labels || "[]");
    const series = JSON.parse(canvas.dataset.series || "[]");
    const unit = canvas.dataset.unit || "";
    const fmt = formatter(unit);
    const stacked = kind === "stacked-bar";
    const datasets = series.map((s, i) => {
      const color = PALETTE[i % PALETTE.length];
      return kind === "line"
        ? { label: s.label, data: s.values, borderColor: color, backgroundColor: color + "33",
            borderWidth: 2, pointRadius: 2, tension: 0, fill: false }
        : { label: s.label, data: s.values, backgroundColor: color, borderWidth: 0, maxBarThickness: 56 };
    });
    return {
      type: kind === "line" ? "line" : "bar",
      data: { labels, datasets },
      options: {
        responsive: true,
        maintainAspectRatio: false,
        animation: false,
        interaction: { mode: "index", intersect: false },
        plugins: {
          legend: { display: series.length > 1, position: "bottom" },
          tooltip: { callbacks: { label: (ctx) => (ctx.dataset.label || "") + ": " + fmt(ctx.parsed.y) } },
        },
        scales: {
          x: { stacked, grid: { display: false } },
          y: { stacked, beginAtZero: true, title: { display: Boolean(unit), text: unit }, ticks: { callback: fmt } },
        },
      },
    };
  }

  function initCharts(root) {
    if (!window.Chart || !root.querySelectorAll) return;
    const canvases = root.matches && root.matches("canvas.tm-chart") ? [root] : root.querySelectorAll("canvas.tm-chart");
    for (const canvas of canvases) {
      if (window.Chart.getChart(canvas)) continue;
      try {
        new window.Chart(canvas, chartConfig(canvas));
      } catch (err) {
        console.error("tokenmart console: chart not drawn", canvas, err);
      }
    }
  }

  // htmx runs onLoad for the page and again for every swapped-in fragment.
  if (window.htmx) {
    window.htmx.onLoad(initCharts);
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", () => initCharts(document));
  } else {
    initCharts(document);
  }

  document.addEventListener("htmx:configRequest", (event) => {
    const meta = document.querySelector('meta[name="csrf-token"]');
    if (meta && meta.content) event.detail.headers["X-CSRF-Token"] = meta.content;
  });

  // Capture phase: a declined form stops here, before htmx's own submit listener on the form.
  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (!(form instanceof HTMLFormElement) || !form.hasAttribute("data-confirm")) return;
    if (!window.confirm(form.getAttribute("data-confirm"))) {
      event.preventDefault();
      event.stopPropagation();
    }
  }, true);

  async function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
    // Plain-HTTP origins other than localhost have no clipboard API.
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "tm-offscreen";
    document.body.appendChild(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    if (!ok) throw new Error("copy refused");
  }

  document.addEventListener("click", (event) => {
    const button = event.target.closest ? event.target.closest("button[data-copy-target]") : null;
    if (!button) return;
    event.preventDefault();
    const source = document.querySelector(button.getAttribute("data-copy-target"));
    if (!source) return;
    const field = source instanceof HTMLInputElement || source instanceof HTMLTextAreaElement;
    const text = (field ? source.value : source.textContent).trim();
    copyText(text).then(
      () => { button.textContent = "Copied"; button.classList.add("copied"); },
      () => { button.textContent = "Copy failed"; },
    );
  });
})();

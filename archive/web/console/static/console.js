// The web console's light JavaScript: a placeholder for thumbnails that cannot be
// shown, and the dashboard's charts (Chart.js, vendored). No inline script anywhere:
// the pages' Content-Security-Policy allows scripts of this origin only.
"use strict";

function placeholder(img) {
  if (img.dataset.failed) return;
  img.dataset.failed = "1";
  const span = document.createElement("span");
  span.className = "thumb none";
  span.textContent = "no preview";
  img.replaceWith(span);
}

document.addEventListener("error", (event) => {
  if (event.target instanceof HTMLImageElement && event.target.classList.contains("thumb")) {
    placeholder(event.target);
  }
}, true);

function drawCharts() {
  const source = document.getElementById("chart-data");
  if (!source || typeof Chart === "undefined") return;
  const data = JSON.parse(source.textContent);
  const colors = ["#1f5fa8", "#d9822b", "#2e8b57", "#a23b72", "#6a5acd", "#c0392b",
                  "#16a085", "#7f8c8d", "#b8860b", "#34495e"];
  for (const canvas of document.querySelectorAll("canvas[data-chart]")) {
    const chart = data[canvas.dataset.chart];
    if (!chart) continue;
    const name = canvas.dataset.chart;
    const timeline = name === "days" || name === "weeks" || name === "growth";
    const growth = name === "growth";
    new Chart(canvas, {
      type: growth ? "line" : "bar",
      data: {
        labels: chart.labels,
        datasets: [{
          label: growth ? "bytes" : "instances",
          data: chart.values,
          backgroundColor: growth ? "rgba(31, 95, 168, 0.2)" : timeline ? colors[0] : chart.labels.map((_, i) => colors[i % colors.length]),
          borderColor: colors[0],
          fill: growth,
          pointRadius: growth ? 2 : undefined,
        }],
      },
      options: {
        animation: false,
        maintainAspectRatio: false,
        indexAxis: timeline ? "x" : "y",
        plugins: { legend: { display: false } },
        scales: { [timeline ? "y" : "x"]: { beginAtZero: true, ticks: growth ? { callback: size } : { precision: 0 } } },
      },
    });
  }
}

// Bytes as the pages write them (1000-based).
function size(value) {
  const units = ["bytes", "KB", "MB", "GB", "TB"];
  let n = value, unit = 0;
  while (n >= 1000 && unit < units.length - 1) { n /= 1000; unit++; }
  return unit ? `${n.toFixed(1)} ${units[unit]}` : `${n} bytes`;
}

document.addEventListener("DOMContentLoaded", () => {
  for (const img of document.querySelectorAll("img.thumb")) {
    if (img.complete && img.naturalWidth === 0) placeholder(img);
  }
  drawCharts();
});

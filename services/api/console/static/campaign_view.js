// The campaign view's live counts (plain ES, no build step; a file of its own, as the CSP allows scripts from 'self'
// only). Without it the page shows the counts as they were when it loaded.
// An EventSource reads /console/campaigns/ID/progress (a `progress` event whenever the status or a count changes,
// checked twice a second) and writes each figure into the element that shows it: [data-count=STATUS],
// [data-reason-count=REASON], the status badge, the stopped mark and the progress bar. The stream ends once the
// campaign is final and its counts have caught up: the source is closed then, or EventSource would reconnect.
"use strict";

(() => {
  function setText(root, selector, value) {
    for (const element of root.querySelectorAll(selector)) element.textContent = String(value);
  }

  function apply(root, progress) {
    for (const [status, n] of Object.entries(progress.counts)) setText(root, `[data-count="${status}"]`, n);
    for (const element of root.querySelectorAll("[data-reason-count]")) {
      element.textContent = String(progress.reasons[element.dataset.reasonCount] || 0);
    }
    setText(root, "[data-done]", progress.done);
    setText(root, "[data-total]", progress.total);
    const bar = root.querySelector("progress");
    if (bar) {
      bar.max = progress.total || 1;
      bar.value = progress.done;
      bar.textContent = `${progress.done} of ${progress.total}`;
    }
    for (const badge of document.querySelectorAll("[data-campaign-status]")) {
      badge.textContent = progress.status_words;
      badge.className = `badge status-${progress.status}`;
    }
    for (const mark of document.querySelectorAll("[data-stopped]")) {
      mark.textContent = progress.stopped_words;
      mark.hidden = !progress.stopped;
    }
  }

  function start() {
    const root = document.querySelector("[data-progress-url]");
    if (!root || root.dataset.final === "true" || typeof EventSource !== "function") return;
    const live = root.querySelector("[data-live]");
    const source = new EventSource(root.dataset.progressUrl);
    let updates = 0;
    source.addEventListener("progress", (event) => {
      const progress = JSON.parse(event.data);
      apply(root, progress);
      updates += 1;
      root.dataset.updates = String(updates); // how many updates arrived: a test waits on it
      if (live) live.textContent = progress.final ? "Final" : "Live";
      if (progress.final) {
        root.dataset.final = "true";
        source.close();
      }
    });
    source.addEventListener("error", () => {
      // EventSource reconnects by itself; a closed one (signed out, the campaign gone) stays as it is.
      if (live && source.readyState === EventSource.CLOSED) live.textContent = "Not live: reload the page";
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();

// The dashboard's only script: live task states, by polling a small JSON route.
// Rows marked data-live (tasks still pending or running) are asked about every few
// seconds while the page is visible; a changed state is written into the row. A task
// page reloads itself once its task changes state, to show the new history and outputs.
(function () {
  "use strict";

  function liveRows(root) {
    return Array.prototype.slice.call(root.querySelectorAll("tr[data-row-id][data-live]"));
  }

  function setState(row, task) {
    var cell = row.querySelector(".live-state");
    if (cell) {
      var badge = document.createElement("span");
      badge.className = "badge state-" + task.state;
      badge.setAttribute("data-state", task.state);
      badge.textContent = task.state;
      cell.replaceChildren(badge);
    }
    var upstream = row.querySelector(".live-upstream");
    if (upstream) { upstream.textContent = task.upstream_state || "-"; }
    var updated = row.querySelector(".live-updated");
    if (updated && task.updated_at) {
      updated.textContent = task.updated_at.slice(0, 19).replace("T", " ") + " UTC";
    }
  }

  function poll(root) {
    var url = root.getAttribute("data-live-url");
    var interval = 1000 * Number(root.getAttribute("data-live-interval") || "2");
    function tick() {
      var rows = liveRows(root);
      if (rows.length === 0) { return; }
      if (document.hidden) { window.setTimeout(tick, interval); return; }
      var query = rows.map(function (row) {
        return "id=" + encodeURIComponent(row.getAttribute("data-row-id"));
      }).join("&");
      fetch(url + "?" + query, {credentials: "same-origin", headers: {accept: "application/json"}})
        .then(function (answer) {
          if (answer.status === 401) { window.location.reload(); throw new Error("signed out"); }
          if (!answer.ok) { throw new Error("live update answered " + answer.status); }
          return answer.json();
        })
        .then(function (body) {
          rows.forEach(function (row) {
            var task = body.tasks[row.getAttribute("data-row-id")];
            var shown = row.querySelector("[data-state]");
            if (!task || (shown && shown.getAttribute("data-state") === task.state)) { return; }
            if (row.hasAttribute("data-reload-on-change")) { window.location.reload(); return; }
            setState(row, task);
            if (task.state !== "pending" && task.state !== "running") {
              row.removeAttribute("data-live");
            }
          });
          window.setTimeout(tick, interval);
        })
        .catch(function () { window.setTimeout(tick, interval * 2); });
    }
    window.setTimeout(tick, interval);
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live-url]").forEach(poll);
  });
})();

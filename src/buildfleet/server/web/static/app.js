// buildfleet's fleet page: refreshes the page's live part in place and sends the
// buttons' changes.  Plain JavaScript, no build step, nothing from elsewhere.
(function () {
  "use strict";

  var PERIOD_MS = 2000;
  var live = document.getElementById("live");
  var flash = document.getElementById("flash");
  var updated = document.getElementById("updated");
  var busy = false;

  function show(message, failed) {
    if (!flash) { return; }
    flash.textContent = message;
    flash.className = failed ? "error" : "ok";
    flash.hidden = false;
  }

  function toLogin() {
    window.location.assign("/login?next=" +
      encodeURIComponent(window.location.pathname + window.location.search));
  }

  function refresh() {
    if (busy || !live || !live.hasAttribute("data-live") || document.hidden) {
      return Promise.resolve();
    }
    busy = true;
    return fetch(window.location.href, {
      headers: { "X-Buildfleet-Fragment": "1" },
      credentials: "same-origin",
      cache: "no-store"
    }).then(function (response) {
      if (response.status === 401) { toLogin(); return null; }
      return response.ok ? response.text() : null;
    }).then(function (html) {
      if (html !== null) {
        live.innerHTML = html;
        if (updated) { updated.textContent = "Last update " + new Date().toLocaleTimeString() + "."; }
        document.body.setAttribute("data-refreshed", String(Date.now()));
      }
    }).catch(function () {
      // The server is restarting or the network is down: the next tick tries again.
    }).then(function () { busy = false; });
  }

  function change(action, body) {
    return fetch("/api/" + action, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Buildfleet-Request": "page" },
      credentials: "same-origin",
      body: JSON.stringify(body)
    }).then(function (response) {
      if (response.status === 401) { toLogin(); return; }
      return response.json().then(function (answer) {
        show(answer.message || answer.error || response.statusText, !response.ok);
      });
    }).catch(function (error) {
      show("The server did not answer: " + error, true);
    }).then(refresh);
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-action]");
    if (!button) { return; }
    event.preventDefault();
    var body = {};
    Object.keys(button.dataset).forEach(function (key) {
      if (key !== "action") { body[key] = button.dataset[key]; }
    });
    button.disabled = true;
    change(button.dataset.action, body);
  });

  document.addEventListener("submit", function (event) {
    var form = event.target.closest("form[data-action]");
    if (!form) { return; }
    event.preventDefault();
    var body = {};
    new FormData(form).forEach(function (value, key) { body[key] = String(value); });
    change(form.dataset.action, body).then(function () { form.reset(); });
  });

  document.addEventListener("change", function (event) {
    if (event.target.matches("select[data-autosubmit]")) { event.target.form.submit(); }
  });

  // A running action's output: each <pre data-output> fetches what was added since
  // its last poll until the server says the output is complete.
  var OUTPUT_MS = 1000;
  var outputs = Array.prototype.slice.call(document.querySelectorAll("pre[data-output]"));
  var state = document.querySelector(".output-state");

  function follow(pre) {
    var offset = Number(pre.getAttribute("data-offset") || "0");
    var url = "/output?name=" + encodeURIComponent(pre.dataset.name) +
      "&stream=" + encodeURIComponent(pre.dataset.output) + "&offset=" + offset;
    return fetch(url, { credentials: "same-origin", cache: "no-store" }).then(function (response) {
      if (response.status === 401) { toLogin(); return; }
      if (!response.ok) { pre.setAttribute("data-complete", "1"); return; }
      var next = response.headers.get("X-Output-Next") || String(offset);
      var complete = response.headers.get("X-Output-Complete") === "1";
      return response.text().then(function (text) {
        pre.appendChild(document.createTextNode(text));  // text, never HTML
        pre.setAttribute("data-offset", next);
        if (complete) { pre.setAttribute("data-complete", "1"); }
      });
    }).catch(function () {
      // the next tick tries again
    });
  }

  function followAll() {
    var running = outputs.filter(function (pre) { return !pre.hasAttribute("data-complete"); });
    if (outputs.length && !running.length) {
      if (state) { state.textContent = "The action has ended: its whole output is in its result."; }
      return;
    }
    Promise.all(running.map(follow)).then(function () { window.setTimeout(followAll, OUTPUT_MS); });
  }

  if (outputs.length) { followAll(); }
  document.addEventListener("visibilitychange", refresh);
  window.setInterval(refresh, PERIOD_MS);
}());

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

  document.addEventListener("visibilitychange", refresh);
  window.setInterval(refresh, PERIOD_MS);
}());

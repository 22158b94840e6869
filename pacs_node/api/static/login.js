/* Login page: exchange a token for a session cookie (POST /api/v1/session). */
"use strict";

(() => {
  const form = document.getElementById("login-form");
  const input = document.getElementById("token");
  const box = document.getElementById("notice");

  /* Only a path on this node is followed after login (no open redirect). */
  function next() {
    const n = new URLSearchParams(window.location.search).get("next") || "/";
    return n.startsWith("/") && !n.startsWith("//") && !n.startsWith("/\\") ? n : "/";
  }

  function notice(message) {
    box.hidden = !message;
    box.textContent = message || "";
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const token = input.value.trim();
    input.value = "";
    if (!token) return;
    notice("");
    try {
      const resp = await fetch("/api/v1/session", {
        method: "POST", headers: { Authorization: "Bearer " + token }, credentials: "same-origin", cache: "no-store",
      });
      if (resp.ok) {
        window.location.replace(next());
        return;
      }
      notice(resp.status === 401 ? "This token is not valid on this node." : "Login failed: HTTP " + resp.status);
    } catch (err) {
      notice("Cannot reach the node: " + err.message);
    }
  });
  input.focus();
})();

// Every htmx request carries the page's CSRF token (from <meta name="csrf-token">), so htmx
// attributes such as hx-post and hx-delete work against the session-authenticated API.
document.addEventListener("htmx:configRequest", function (event) {
  var meta = document.querySelector('meta[name="csrf-token"]');
  if (meta && meta.content) {
    event.detail.headers["X-CSRF-Token"] = meta.content;
  }
});

// Keyboard-first labelling (the keys are listed on the page). One set of document listeners,
// however often htmx swaps a labelling page in: each key looks up the current form.
(function () {
  if (window.loftLabelling) return;
  window.loftLabelling = true;

  function form() { return document.getElementById("labelling"); }
  function questions(f) { return Array.prototype.slice.call(f.querySelectorAll("fieldset.question")); }
  function active(f) { return f.querySelector("fieldset.question.active") || questions(f)[0]; }

  function activate(f, q) {
    questions(f).forEach(function (x) { x.classList.toggle("active", x === q); });
    if (q) q.scrollIntoView({ block: "nearest" });
  }

  function move(f, step) {
    var qs = questions(f), i = qs.indexOf(active(f)) + step;
    if (i >= 0 && i < qs.length) activate(f, qs[i]);
  }

  function choose(f, q, key) {
    var kind = q.dataset.kind;
    if (kind === "ranking") {
      var selects = Array.prototype.slice.call(q.querySelectorAll("select"));
      var target = q.querySelector('select[data-key="' + key + '"]');
      if (!target || target.value) return;
      var used = selects.filter(function (s) { return s.value; }).length;
      target.value = String(used + 1);
      if (used + 1 === selects.length) move(f, 1);
      return;
    }
    var input = q.querySelector('input[data-key="' + key + '"]');
    if (!input) return;
    input.checked = true;
    move(f, 1);
  }

  function send(f, action) {
    var button = f.querySelector('button[value="' + action + '"]');
    if (button) button.click();
  }

  document.addEventListener("keydown", function (event) {
    var f = form();
    if (!f || event.altKey || event.metaKey) return;
    var typing = /^(TEXTAREA|INPUT|SELECT)$/.test(event.target.tagName) &&
      event.target.type !== "radio" && event.target.type !== "checkbox";
    if (typing) {
      if (event.key === "Escape") { event.target.blur(); }
      else if (event.key === "Enter" && event.ctrlKey) { event.preventDefault(); send(f, "submit"); }
      return;
    }
    if (event.ctrlKey) return;
    var q = active(f);
    if (/^[0-9]$/.test(event.key)) {
      if (q) { event.preventDefault(); choose(f, q, event.key); }
    } else if (event.key === "Enter") {
      event.preventDefault(); send(f, "submit");
    } else if (event.key === "s") {
      event.preventDefault(); send(f, "draft");
    } else if (event.key === "d") {
      event.preventDefault(); send(f, "discard");
    } else if (event.key === "ArrowDown") {
      event.preventDefault(); move(f, 1);
    } else if (event.key === "ArrowUp") {
      event.preventDefault(); move(f, -1);
    } else if ((event.key === "j" || event.key === "ArrowRight") && f.dataset.next) {
      window.location.assign(f.dataset.next);
    } else if ((event.key === "k" || event.key === "ArrowLeft") && f.dataset.prev) {
      window.location.assign(f.dataset.prev);
    } else if (event.key === "Backspace" && q && q.dataset.kind === "ranking") {
      event.preventDefault();
      q.querySelectorAll("select").forEach(function (s) { s.value = ""; });
    }
  });

  document.addEventListener("click", function (event) {
    var f = form(), q = event.target.closest && event.target.closest("fieldset.question");
    if (f && q && f.contains(q)) activate(f, q);
  });
})();

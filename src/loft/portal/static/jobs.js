// The job page: loss, eval-loss, learning-rate and throughput curves (uPlot, vendored) and the
// job's status and log, kept live by the job's server-sent event stream
// (GET /api/jobs/ID/events: "status", "metrics", "log", "warning", then "end").
// Each chart's <figure> carries data-points: how many points it plots now.
(function () {
  "use strict";
  var COLORS = ["#1f5fbf", "#c2410c", "#1e7a3c", "#7c3aed", "#b3261e", "#0e7490"];
  var LOG_LIMIT = 256 * 1024;

  // an axis label: 3 significant digits, small and large numbers in exponent form (1.0e-4)
  function tick(v) {
    if (v === null || v === undefined) { return ""; }
    var a = Math.abs(v);
    if (a !== 0 && (a < 0.01 || a >= 1e6)) { return v.toExponential(1); }
    return String(Number(v.toPrecision(3)));
  }

  function text(id, value) {
    var el = document.getElementById(id);
    if (el) { el.textContent = value; }
  }

  function Job(run) {
    this.run = run;
    this.series = {};  // metric -> Map(step -> value)
    this.charts = [];  // {el, keys, plot}
    this.logFrom = null;
    this.source = null;
    var self = this;
    run.querySelectorAll("figure.chart").forEach(function (fig) {
      self.charts.push({ el: fig, keys: fig.dataset.keys.split(","), plot: null });
    });
    window.addEventListener("resize", function () { self.resize(); });
  }

  Job.prototype.known = function (key) {
    return this.charts.some(function (c) { return c.keys.indexOf(key) >= 0; });
  };

  Job.prototype.addChart = function (key) {
    var box = document.getElementById("more-charts");
    if (!box) { return null; }
    var fig = document.createElement("figure");
    fig.className = "chart";
    fig.id = "chart-" + key.replace(/[^A-Za-z0-9_-]/g, "-");
    fig.dataset.keys = key;
    fig.dataset.points = "0";
    var cap = document.createElement("figcaption");
    cap.textContent = key + " ";
    var count = document.createElement("span");
    count.className = "count kv";
    cap.appendChild(count);
    var plot = document.createElement("div");
    plot.className = "plot";
    fig.appendChild(cap);
    fig.appendChild(plot);
    box.appendChild(fig);
    var chart = { el: fig, keys: [key], plot: null };
    this.charts.push(chart);
    return chart;
  };

  Job.prototype.options = function (chart) {
    var width = chart.el.querySelector(".plot").clientWidth || 420;
    return {
      width: Math.max(260, width),
      height: 200,
      scales: { x: { time: false } },
      axes: [
        { label: "step" },
        { size: 64, values: function (_u, splits) { return splits.map(tick); } },
      ],
      series: [{ label: "step" }].concat(chart.keys.map(function (key, i) {
        var sparse = key.indexOf("eval/") === 0;
        return {
          label: key,
          stroke: COLORS[i % COLORS.length],
          width: 1.5,
          spanGaps: true,
          points: { show: sparse ? true : undefined },
        };
      })),
    };
  };

  Job.prototype.draw = function (chart) {
    var series = this.series;
    var steps = {};
    chart.keys.forEach(function (key) {
      if (series[key]) { series[key].forEach(function (_v, step) { steps[step] = true; }); }
    });
    var xs = Object.keys(steps).map(Number).sort(function (a, b) { return a - b; });
    var plotted = 0;
    var data = [xs].concat(chart.keys.map(function (key) {
      var m = series[key] || new Map();
      return xs.map(function (step) {
        if (!m.has(step)) { return null; }
        plotted += 1;
        return m.get(step);
      });
    }));
    if (!xs.length) { return; }
    if (chart.plot === null) {
      chart.plot = new uPlot(this.options(chart), data, chart.el.querySelector(".plot"));
    } else {
      chart.plot.setData(data);
    }
    chart.el.dataset.points = String(plotted);
    chart.el.querySelector(".count").textContent = plotted + (plotted === 1 ? " point" : " points");
  };

  Job.prototype.resize = function () {
    this.charts.forEach(function (c) {
      if (c.plot) {
        var width = c.el.querySelector(".plot").clientWidth;
        if (width) { c.plot.setSize({ width: Math.max(260, width), height: 200 }); }
      }
    });
  };

  Job.prototype.metrics = function (points) {
    var self = this;
    var touched = [];
    Object.keys(points).forEach(function (key) {
      var m = self.series[key] || (self.series[key] = new Map());
      points[key].forEach(function (p) { m.set(p[0], p[1]); });
      if (!self.known(key)) { self.addChart(key); }
      self.charts.forEach(function (c) {
        if (c.keys.indexOf(key) >= 0 && touched.indexOf(c) < 0) { touched.push(c); }
      });
    });
    touched.forEach(function (c) { self.draw(c); });
  };

  Job.prototype.status = function (s) {
    var badge = document.getElementById("job-status");
    if (badge) {
      badge.textContent = s.status.toLowerCase();
      badge.className = "status s-" + s.status.toLowerCase();
    }
    var bar = document.getElementById("job-progress");
    if (bar) { bar.value = s.pct; }
    var p = s.progress || {};
    if (p.step && p.total) {
      var line = "step " + p.step + "/" + p.total;
      if (typeof p.loss === "number") { line += ", loss " + p.loss.toFixed(4); }
      if (p.eta_s) { line += ", eta " + p.eta_s + " s"; }
      text("job-progress-text", line);
    }
    text("job-attempts", String(s.attempts));
    if (s.started_at) { text("job-started", s.started_at); }
    text("job-error", s.error || "");
    var cancel = document.getElementById("cancel-form");
    if (cancel && ["SUCCEEDED", "FAILED", "CANCELLED"].indexOf(s.status) >= 0) { cancel.remove(); }
  };

  Job.prototype.log = function (d) {
    var pre = document.getElementById("log");
    if (!pre) { return; }
    var near = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 40;
    var all = pre.textContent + d.text;
    pre.textContent = all.length > LOG_LIMIT ? all.slice(all.length - LOG_LIMIT) : all;
    if (near) { pre.scrollTop = pre.scrollHeight; }
  };

  // What only the finished job knows (its run's summary, its history): from the page again.
  Job.prototype.refresh = function () {
    fetch(window.location.pathname, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : ""; })
      .then(function (html) {
        if (!html) { return; }
        var fresh = new DOMParser().parseFromString(html, "text/html");
        document.querySelectorAll("[data-refresh-on-end]").forEach(function (el) {
          var now = fresh.getElementById(el.id);
          if (now) { el.replaceWith(document.importNode(now, true)); }
        });
        document.body.dataset.refreshed = "1";
      });
  };

  Job.prototype.connect = function () {
    var self = this;
    var url = this.run.dataset.events;
    if (this.logFrom !== null) { url = url.replace(/log_from=-?\d+/, "log_from=" + this.logFrom); }
    var es = new EventSource(url);
    this.source = es;
    es.addEventListener("metrics", function (e) { self.metrics(JSON.parse(e.data).points); });
    es.addEventListener("status", function (e) { self.status(JSON.parse(e.data)); });
    es.addEventListener("log", function (e) {
      var d = JSON.parse(e.data);
      self.logFrom = d.end;
      self.log(d);
    });
    es.addEventListener("warning", function (e) { text("stream-note", JSON.parse(e.data).message); });
    es.addEventListener("end", function (e) {
      es.close();
      self.run.dataset.state = "ended";
      text("stream-note", "The job has ended (" + JSON.parse(e.data).status.toLowerCase() + ").");
      self.refresh();
    });
    es.onopen = function () {
      if (self.run.dataset.state !== "ended") { self.run.dataset.state = "live"; }
    };
    es.onerror = function () {
      es.close();
      if (self.run.dataset.state === "ended") { return; }
      self.run.dataset.state = "reconnecting";
      text("stream-note", "Lost the connection to the portal; trying again…");
      setTimeout(function () { self.connect(); }, 3000);
    };
  };

  function start() {
    var run = document.getElementById("run");
    if (!run || run.dataset.bound || typeof uPlot === "undefined") { return; }
    run.dataset.bound = "1";
    var job = new Job(run);
    window.loftJob = job;  // for the curious (and the browser tests): series, charts
    if (run.querySelector("figure.chart") || run.dataset.state !== "ended") { job.connect(); }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
  document.addEventListener("htmx:afterSettle", start);
})();

// The collection page: a searchable, filterable grid (rendered a page at a time, so the DOM stays
// small at any size) and a map drawn on a canvas (points at any size; the pictures themselves once
// zoomed in). Every text comes from CSVs and is set with textContent, never as HTML.
(function () {
  "use strict";
  var D = window.PAINTSIM;
  if (!D) { return; }
  var F = {}; D.fields.forEach(function (f, i) { F[f] = i; });
  var rows = D.rows, n = rows.length, PAGE = 60;
  var hay = rows.map(function (r) { return (r[F.title] + " \u0001 " + r[F.artist]).toLowerCase(); });
  var artists = rows.map(function (r) { return (r[F.artist] || "").toLowerCase(); });
  var shown = new Uint8Array(n).fill(1), matches = [], limit = PAGE;
  var $ = function (id) { return document.getElementById(id); };
  var grid = $("grid"), more = $("more"), count = $("count");

  function pageOf(r) { return "paintings/" + r[F.stem] + ".html"; }
  function thumbOf(r) { return "thumbs/" + r[F.stem] + ".jpg"; }

  function card(r) {
    var a = document.createElement("a");
    a.className = "card"; a.href = pageOf(r);
    if (r[F.thumb]) {
      var img = document.createElement("img");
      img.loading = "lazy"; img.alt = ""; img.src = thumbOf(r);
      a.appendChild(img);
    } else {
      var box = document.createElement("div"); box.className = "noimage"; box.textContent = "no image";
      a.appendChild(box);
    }
    [["t", r[F.title]], ["a", r[F.artist] || "Unknown artist"], ["d", r[F.date]]].forEach(function (p) {
      if (!p[1]) { return; }
      var s = document.createElement("span"); s.className = p[0]; s.textContent = p[1]; a.appendChild(s);
    });
    return a;
  }

  function renderGrid() {
    var frag = document.createDocumentFragment();
    var upto = Math.min(limit, matches.length);
    for (var i = grid.children.length; i < upto; i++) { frag.appendChild(card(rows[matches[i]])); }
    grid.appendChild(frag);
    more.hidden = upto >= matches.length;
    count.textContent = matches.length === n ? n + " paintings" : matches.length + " of " + n + " paintings";
  }

  function num(id) { var v = $(id).value.trim(); return v === "" ? null : Number(v); }

  function applyFilters() {
    var q = $("q").value.trim().toLowerCase(), who = $("artist").value.trim().toLowerCase();
    var lo = num("from"), hi = num("to");
    matches = [];
    for (var i = 0; i < n; i++) {
      var r = rows[i], ok = true, y = r[F.year];
      if (q && hay[i].indexOf(q) < 0) { ok = false; }
      if (ok && who && artists[i].indexOf(who) < 0) { ok = false; }
      if (ok && (lo !== null || hi !== null)) {
        ok = y !== null && (lo === null || y >= lo) && (hi === null || y <= hi);
      }
      shown[i] = ok ? 1 : 0;
      if (ok) { matches.push(i); }
    }
    grid.textContent = ""; limit = PAGE;
    renderGrid(); drawSoon();
  }

  ["q", "artist", "from", "to"].forEach(function (id) { $(id).addEventListener("input", applyFilters); });
  more.addEventListener("click", function () { limit += PAGE; renderGrid(); });

  // ------------------------------------------------------------------ the map
  var canvas = $("map"), ctx = canvas.getContext("2d"), tip = $("tooltip");
  var view = { s: 1, x: 0, y: 0 }, W = 0, H = 0, dpr = window.devicePixelRatio || 1;
  var images = {}, pending = false, hover = -1;
  var THUMBS_BELOW = 350;   // draw the pictures when at most this many paintings are in view

  function resize() {
    var rect = canvas.getBoundingClientRect();
    W = Math.max(200, rect.width); H = Math.max(200, rect.height);
    canvas.width = Math.round(W * dpr); canvas.height = Math.round(H * dpr);
    drawSoon();
  }
  function base() { return Math.min(W, H) * 0.46; }
  function sx(i) { return W / 2 + (rows[i][F.x] * base() + view.x) * view.s; }
  function sy(i) { return H / 2 - (rows[i][F.y] * base() - view.y) * view.s; }

  function picture(i) {
    var key = rows[i][F.stem], img = images[key];
    if (!img) {
      img = images[key] = new Image();
      img.onload = drawSoon;
      img.src = thumbOf(rows[i]);
    }
    return img.complete && img.naturalWidth > 0 ? img : null;
  }

  function draw() {
    pending = false;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, W, H);
    var inView = [];
    for (var i = 0; i < n; i++) {
      var x = sx(i), y = sy(i);
      if (x < -40 || y < -40 || x > W + 40 || y > H + 40) { continue; }
      inView.push(i);
    }
    var size = Math.max(2, Math.min(5, 3 * Math.sqrt(view.s)));
    ctx.fillStyle = "rgba(120,110,100,0.25)";
    inView.forEach(function (i) { if (!shown[i]) { ctx.fillRect(sx(i) - 1, sy(i) - 1, 2, 2); } });
    ctx.fillStyle = "rgba(138,44,29,0.75)";
    inView.forEach(function (i) { if (shown[i]) { ctx.fillRect(sx(i) - size / 2, sy(i) - size / 2, size, size); } });
    if (inView.length <= THUMBS_BELOW) {
      var side = Math.max(24, Math.min(120, Math.sqrt(W * H / Math.max(1, inView.length)) * 0.55));
      inView.forEach(function (i) {
        if (!shown[i] || !rows[i][F.thumb]) { return; }
        var img = picture(i); if (!img) { return; }
        var k = side / Math.max(img.naturalWidth, img.naturalHeight);
        var w = img.naturalWidth * k, h = img.naturalHeight * k;
        ctx.drawImage(img, sx(i) - w / 2, sy(i) - h / 2, w, h);
        if (i === hover) { ctx.strokeStyle = "#8a2c1d"; ctx.lineWidth = 2; ctx.strokeRect(sx(i) - w / 2, sy(i) - h / 2, w, h); }
      });
    }
    if (hover >= 0) {
      ctx.strokeStyle = "#8a2c1d"; ctx.lineWidth = 2;
      ctx.beginPath(); ctx.arc(sx(hover), sy(hover), 7, 0, 2 * Math.PI); ctx.stroke();
    }
    canvas.dataset.drawn = String(inView.length);
  }
  function drawSoon() { if (!pending) { pending = true; window.requestAnimationFrame(draw); } }

  function nearest(mx, my) {
    var best = -1, bestD = 14 * 14;
    for (var i = 0; i < n; i++) {
      if (!shown[i]) { continue; }
      var dx = sx(i) - mx, dy = sy(i) - my, d = dx * dx + dy * dy;
      if (d < bestD) { bestD = d; best = i; }
    }
    return best;
  }
  function local(ev) { var r = canvas.getBoundingClientRect(); return [ev.clientX - r.left, ev.clientY - r.top]; }

  var drag = null, moved = false;
  canvas.addEventListener("mousedown", function (ev) { drag = local(ev); moved = false; canvas.classList.add("dragging"); });
  window.addEventListener("mouseup", function () { drag = null; canvas.classList.remove("dragging"); });
  canvas.addEventListener("mousemove", function (ev) {
    var p = local(ev);
    if (drag) {
      var dx = p[0] - drag[0], dy = p[1] - drag[1];
      if (Math.abs(dx) + Math.abs(dy) > 2) { moved = true; }
      view.x += dx / view.s; view.y += dy / view.s; drag = p; drawSoon(); return;
    }
    var h = nearest(p[0], p[1]);
    if (h !== hover) { hover = h; drawSoon(); }
    if (h < 0) { tip.hidden = true; return; }
    var r = rows[h];
    tip.textContent = r[F.title] + " \u2014 " + (r[F.artist] || "Unknown artist") + (r[F.date] ? " (" + r[F.date] + ")" : "");
    tip.hidden = false;
    tip.style.left = Math.min(p[0] + 14, W - 200) + "px"; tip.style.top = (p[1] + 14) + "px";
  });
  canvas.addEventListener("mouseleave", function () { hover = -1; tip.hidden = true; drawSoon(); });
  canvas.addEventListener("click", function (ev) {
    if (moved) { return; }
    var p = local(ev), h = nearest(p[0], p[1]);
    if (h >= 0) { window.location.href = pageOf(rows[h]); }
  });
  canvas.addEventListener("wheel", function (ev) {
    ev.preventDefault();
    var p = local(ev), f = Math.exp(-ev.deltaY * 0.0015);
    var s2 = Math.max(0.5, Math.min(400, view.s * f)); f = s2 / view.s;
    // keep the point under the cursor in place
    var wx = (p[0] - W / 2) / view.s - view.x, wy = (p[1] - H / 2) / view.s - view.y;
    view.s = s2;
    view.x = (p[0] - W / 2) / view.s - wx; view.y = (p[1] - H / 2) / view.s - wy;
    drawSoon();
  }, { passive: false });
  window.addEventListener("resize", resize);

  window.paintsimExplorer = { view: view, draw: draw, matches: function () { return matches.length; } };
  resize();
  applyFilters();
})();

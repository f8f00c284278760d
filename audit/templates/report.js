(function () {
  "use strict";
  // One filter for the cards and the case table: an outcome button and the search box (case id, labels,
  // spec and model, lower-cased into data-search by the page). The buttons count cases, so a button's
  // number is the number of cards it shows.
  var cards = Array.prototype.slice.call(document.querySelectorAll("article.card"));
  var table = document.getElementById("cases");
  var rows = table ? Array.prototype.slice.call(table.tBodies[0].rows) : [];
  var buttons = Array.prototype.slice.call(document.querySelectorAll(".filters button[data-filter]"));
  var search = document.getElementById("search");
  var shown = document.getElementById("shown-count");
  var noMatch = document.getElementById("no-match");
  var current = "all";

  function matches(el, needle) {
    var byOutcome = current === "all" || el.getAttribute("data-outcome") === current;
    return byOutcome && (!needle || (el.getAttribute("data-search") || "").indexOf(needle) !== -1);
  }

  function apply() {
    var needle = (search.value || "").trim().toLowerCase();
    var visible = 0;
    cards.forEach(function (card) {
      var show = matches(card, needle);
      if (card.hidden === show) { card.hidden = !show; }
      if (show) { visible += 1; }
    });
    rows.forEach(function (row) {
      var show = matches(row, needle);
      if (row.hidden === show) { row.hidden = !show; }
    });
    buttons.forEach(function (b) { b.classList.toggle("active", b.getAttribute("data-filter") === current); });
    shown.textContent = visible + " of " + cards.length + " cases shown";
    noMatch.hidden = visible !== 0;
  }

  function select(filter) {
    current = filter;
    if (history.replaceState) { history.replaceState(null, "", filter === "all" ? "#" : "#" + filter); }
    apply();
  }

  buttons.forEach(function (b) {
    b.addEventListener("click", function () { select(b.getAttribute("data-filter")); });
  });
  search.addEventListener("input", apply);

  // Sorting the case table: a click on a column sorts by it, a second click reverses. Numbers sort by
  // their data-sort value; cells without one (a check that did not run) go last in either direction.
  if (table) {
    var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
    var state = {column: 0, descending: false};   // the page's own order: failures first
    heads.forEach(function (th, column) {
      th.querySelector("button").addEventListener("click", function () {
        state.descending = state.column === column ? !state.descending : false;
        state.column = column;
        sortBy(column, th.getAttribute("data-type") === "num", state.descending);
        heads.forEach(function (h, i) {
          h.setAttribute("aria-sort", i === column ? (state.descending ? "descending" : "ascending") : "none");
        });
      });
    });
  }

  function keyOf(row, column, numeric) {
    var cell = row.cells[column];
    var raw = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent.trim();
    if (raw === "") { return null; }
    if (numeric) { var n = parseFloat(raw); return isNaN(n) ? null : n; }
    return raw.toLowerCase();
  }

  function sortBy(column, numeric, descending) {
    var keyed = rows.map(function (row, i) { return {row: row, key: keyOf(row, column, numeric), i: i}; });
    keyed.sort(function (a, b) {
      if (a.key === null || b.key === null) {
        return a.key === b.key ? a.i - b.i : (a.key === null ? 1 : -1);
      }
      var order = a.key < b.key ? -1 : (a.key > b.key ? 1 : a.i - b.i);
      return descending ? -order : order;
    });
    var body = table.tBodies[0];
    var fragment = document.createDocumentFragment();
    keyed.forEach(function (k) { fragment.appendChild(k.row); });
    body.appendChild(fragment);
    rows = keyed.map(function (k) { return k.row; });
  }

  var fromHash = (location.hash || "").slice(1);
  if (buttons.some(function (b) { return b.getAttribute("data-filter") === fromHash; })) { current = fromHash; }
  apply();

  var box = document.getElementById("lightbox");
  var boxImg = null;   // created on first use so the page holds no empty <img>
  document.addEventListener("click", function (e) {
    var t = e.target;
    if (t && t.classList && t.classList.contains("zoomable")) {
      if (!boxImg) { boxImg = document.createElement("img"); boxImg.alt = "enlarged picture"; box.appendChild(boxImg); }
      boxImg.src = t.src;
      box.hidden = false;
    } else if (t === box || t === boxImg) {
      box.hidden = true;
    }
  });
  document.addEventListener("keydown", function (e) { if (e.key === "Escape") { box.hidden = true; } });
}());

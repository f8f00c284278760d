(function () {
  "use strict";
  var cards = Array.prototype.slice.call(document.querySelectorAll("article.card"));
  var buttons = Array.prototype.slice.call(document.querySelectorAll(".filters button[data-filter]"));
  var search = document.getElementById("search");
  var shown = document.getElementById("shown-count");
  var noMatch = document.getElementById("no-match");
  var current = "all";

  function apply() {
    var needle = (search.value || "").trim().toLowerCase();
    var visible = 0;
    cards.forEach(function (card) {
      var byOutcome = current === "all" || card.getAttribute("data-outcome") === current;
      var byText = !needle || (card.getAttribute("data-case-id") || "").toLowerCase().indexOf(needle) !== -1;
      card.hidden = !(byOutcome && byText);
      if (!card.hidden) { visible += 1; }
    });
    buttons.forEach(function (b) { b.classList.toggle("active", b.getAttribute("data-filter") === current); });
    shown.textContent = visible + " of " + cards.length + " shown";
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

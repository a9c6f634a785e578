(function () {
  "use strict";
  // Sorting: click a column header (again to reverse), or open the page with ?sort=KEY or ?sort=-KEY.
  // Filtering: the selects above the leaderboard, or ?model=..&corpus=..&protocol=..&precision=..&q=TEXT.
  function value(row, key) { return row.getAttribute("data-" + key) || ""; }
  function compare(a, b, key, desc) {
    var x = value(a, key), y = value(b, key);
    if (x === "" || y === "") { return (x === "") - (y === ""); }  // missing values last, either way
    var nx = Number(x), ny = Number(y);
    var c = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
    return desc ? -c : c;
  }
  function sortTable(table, key, desc) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) { return compare(a, b, key, desc); });
    rows.forEach(function (r) { body.appendChild(r); });
    table.querySelectorAll("th[data-key]").forEach(function (th) {
      th.setAttribute("aria-sort", th.getAttribute("data-key") === key ? (desc ? "descending" : "ascending") : "none");
    });
  }
  function sortAll(spec) {
    var desc = spec.charAt(0) === "-", key = desc ? spec.slice(1) : spec;
    document.querySelectorAll("table.sortable").forEach(function (t) {
      if (t.querySelector('th[data-key="' + key + '"]')) { sortTable(t, key, desc); }
    });
    document.documentElement.setAttribute("data-sorted", spec);
  }
  document.querySelectorAll("table.sortable th[data-key]").forEach(function (th) {
    th.addEventListener("click", function () {
      var key = th.getAttribute("data-key");
      sortTable(th.closest("table"), key, th.getAttribute("aria-sort") === "ascending");
    });
  });

  var selects = document.querySelectorAll("select[data-filter]");
  var text = document.getElementById("filter-text");
  function applyFilters() {
    var needle = text ? text.value.trim().toLowerCase() : "";
    var shown = 0, total = 0;
    document.querySelectorAll("table.board tbody tr").forEach(function (row) {
      var ok = true;
      selects.forEach(function (s) { if (s.value !== "" && value(row, s.getAttribute("data-filter")) !== s.value) { ok = false; } });
      if (ok && needle && row.textContent.toLowerCase().indexOf(needle) < 0) { ok = false; }
      row.hidden = !ok;
      total += 1; shown += ok ? 1 : 0;
    });
    document.querySelectorAll("section.group").forEach(function (g) {
      g.hidden = g.querySelectorAll("tbody tr:not([hidden])").length === 0;
    });
    var count = document.getElementById("shown");
    if (count) { count.textContent = shown === total ? "all " + total + " runs shown" : shown + " of " + total + " runs shown"; }
  }
  selects.forEach(function (s) { s.addEventListener("change", applyFilters); });
  if (text) { text.addEventListener("input", applyFilters); }

  var params = new URLSearchParams(window.location.search);
  selects.forEach(function (s) {
    var want = params.get(s.getAttribute("data-filter"));
    if (want !== null) { s.value = want; }
  });
  if (text && params.get("q") !== null) { text.value = params.get("q"); }
  applyFilters();
  if (params.get("sort")) { sortAll(params.get("sort")); }
})();

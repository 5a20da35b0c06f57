// Sortable tables: click a header to sort, click again to reverse. Numbers sort numerically,
// empty values (undefined scores) always go last. The first click on a score sorts best first.
(function () {
  "use strict";
  function sortKey(cell, numeric) {
    var raw = cell ? cell.getAttribute("data-sort") : null;
    if (raw === null || raw === "") { return null; }
    if (!numeric) { return raw; }
    var x = parseFloat(raw);
    return isNaN(x) ? null : x;
  }
  function sortTable(table, th, col) {
    var numeric = th.getAttribute("data-type") === "number";
    var current = th.getAttribute("aria-sort");
    var ascending = current ? current !== "ascending" : !numeric;
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows).map(function (row, i) {
      return { row: row, key: sortKey(row.cells[col], numeric), index: i };
    });
    rows.sort(function (a, b) {
      if (a.key === null || b.key === null) {
        return a.key === b.key ? a.index - b.index : (a.key === null ? 1 : -1);
      }
      var d = numeric ? a.key - b.key : a.key.localeCompare(b.key);
      return (ascending ? d : -d) || a.index - b.index;
    });
    rows.forEach(function (r) { body.appendChild(r.row); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (other) {
      other.removeAttribute("aria-sort");
    });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      var button = th.querySelector("button");
      if (button) {
        button.addEventListener("click", function () { sortTable(table, th, col); });
      }
    });
  });
})();

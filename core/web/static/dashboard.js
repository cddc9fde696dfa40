// The dashboard's only script of its own (the CSP allows no inline script): "select all" on the records page.
document.addEventListener("change", function (event) {
  var box = event.target;
  if (!box.matches || !box.matches("[data-select-all]")) return;
  var form = box.closest("form") || document;
  form.querySelectorAll('input[type="checkbox"][name="id"]').forEach(function (row) { row.checked = box.checked; });
});

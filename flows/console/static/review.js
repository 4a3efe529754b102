// Drag on the image to add a missed lesion: the box goes into the form's `missed` field as DICOM
// pixel coordinates (the SVG's viewBox is the DICOM's pixel grid). Typing boxes works without it.
(function () {
  const svg = document.querySelector("svg.study[data-reviewable]");
  const field = document.querySelector("textarea[name=missed]");
  if (!svg || !field) return;
  let start = null, rect = null;
  const at = (ev) => {
    const p = svg.createSVGPoint();
    p.x = ev.clientX; p.y = ev.clientY;
    const q = p.matrixTransform(svg.getScreenCTM().inverse());
    const [w, h] = svg.getAttribute("viewBox").split(" ").slice(2).map(Number);
    return { x: Math.min(Math.max(q.x, 0), w), y: Math.min(Math.max(q.y, 0), h) };
  };
  svg.addEventListener("mousedown", (ev) => {
    start = at(ev);
    rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    rect.setAttribute("class", "drawing");
    svg.appendChild(rect);
    ev.preventDefault();
  });
  svg.addEventListener("mousemove", (ev) => {
    if (!start) return;
    const p = at(ev);
    rect.setAttribute("x", Math.min(start.x, p.x)); rect.setAttribute("y", Math.min(start.y, p.y));
    rect.setAttribute("width", Math.abs(p.x - start.x)); rect.setAttribute("height", Math.abs(p.y - start.y));
  });
  window.addEventListener("mouseup", (ev) => {
    if (!start) return;
    const p = at(ev), s = start;
    start = null;
    if (Math.abs(p.x - s.x) < 3 || Math.abs(p.y - s.y) < 3) { rect.remove(); return; }
    rect.setAttribute("class", "missed");
    const box = [Math.min(s.x, p.x), Math.min(s.y, p.y), Math.max(s.x, p.x), Math.max(s.y, p.y)]
      .map((v) => Math.round(v)).join(", ");
    field.value = (field.value.trim() ? field.value.trim() + "\n" : "") + box;
  });
})();

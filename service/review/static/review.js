// Records a review: PUT the chosen label as JSON, then mark the item done (or show why it failed).
"use strict";
const base = document.currentScript.src.replace(/\/review\/static\/review\.js.*$/, "");

for (const section of document.querySelectorAll("section.item")) {
  const form = section.querySelector("form");
  const status = form.querySelector(".status");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = form.elements.label.value;
    if (value === "") {
      status.textContent = "choose a class first";
      status.className = "status error";
      return;
    }
    const body = value === "none" ? { none_of_these: true } : { label: Number(value) };
    status.textContent = "saving…";
    status.className = "status";
    try {
      const response = await fetch(`${base}/review/items/${encodeURIComponent(section.dataset.key)}/label`, {
        method: "PUT",
        headers: { "Content-Type": "application/json" },
        credentials: "same-origin",
        body: JSON.stringify(body),
      });
      const answer = await response.json();
      if (!response.ok) {
        throw new Error(answer.error ? answer.error.message : `HTTP ${response.status}`);
      }
      status.textContent = `saved: ${answer.review.class_name}`;
      section.classList.add("done");
      section.dataset.reviewed = answer.review.label === null ? "none" : String(answer.review.label);
    } catch (error) {
      status.textContent = `not saved: ${error.message}`;
      status.className = "status error";
    }
  });
}

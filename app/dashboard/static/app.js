// The live parts of the dashboard, without a page reload: the jobs table re-fetches its rows
// every second, and a job page follows the job's Server-Sent Events. The rows come from the
// server already escaped; everything else is set with textContent, never as HTML.
"use strict";

const REFRESH_MS = 1000;

// Times come from the server in UTC (<time datetime>); shown compact in the viewer's zone:
// the time alone today, the day and time this year, the full date before. UTC stays in the title.
const sameDay = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
const sameYear = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
const otherYear = new Intl.DateTimeFormat(undefined, { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });

function localTimes(root) {
  const now = new Date();
  for (const element of root.querySelectorAll("time[datetime]")) {
    const at = new Date(element.getAttribute("datetime"));
    if (Number.isNaN(at.getTime())) continue;
    const format = at.toDateString() === now.toDateString() ? sameDay
      : at.getFullYear() === now.getFullYear() ? sameYear : otherYear;
    element.textContent = format.format(at);
    element.classList.add("local");
  }
}

function openBatches(body) {
  return new Set(Array.from(body.querySelectorAll("details[open]"), (d) => d.dataset.batchId));
}

function refreshRows(table) {
  const body = table.tBodies[0];
  const url = table.dataset.rowsUrl + window.location.search; // the page's filters
  let busy = false;
  let last = null; // the rows as last fetched (the table's own HTML has local times in it)
  setInterval(async () => {
    if (busy) return; // a slow answer: skip a tick rather than pile requests up
    busy = true;
    try {
      const response = await fetch(url, { credentials: "same-origin" });
      if (response.redirected) {
        window.location.assign(response.url); // the session ended: to the login page
      } else if (response.ok) {
        const rows = await response.text();
        if (rows !== last) {
          const open = openBatches(body); // an expanded batch stays expanded
          body.innerHTML = rows;
          for (const details of body.querySelectorAll("details[data-batch-id]")) {
            if (open.has(details.dataset.batchId)) details.open = true;
          }
          localTimes(body);
          last = rows;
        }
      }
    } catch (error) {
      // the server is restarting or the network blinked: the next tick tries again
    } finally {
      busy = false;
    }
  }, REFRESH_MS);
}

function setText(id, value) {
  document.getElementById(id).textContent = value;
}

// A part of the job page (the tries, the folded result) as the server renders it, escaped;
// with the page's query, which says which page of each long list is shown.
async function refreshPart(id, url) {
  try {
    const response = await fetch(url + window.location.search, { credentials: "same-origin" });
    if (!response.ok || response.redirected) return; // the next change fetches it again
    const part = document.getElementById(id);
    part.innerHTML = await response.text();
    if (typeof localTimes === "function") localTimes(part);
  } catch (error) {
    // the network blinked: the part catches up at the next change
  }
}

function showJob(details, job) {
  const status = document.getElementById("status");
  status.textContent = job.status;
  status.className = "badge " + job.status;
  const fields = ["function", "tries", "enqueue_time", "start_time", "finish_time", "next_try_at", "due_at", "callback"];
  for (const field of fields) {
    setText(field, job[field]);
  }
  const resultBox = document.getElementById("result-box");
  resultBox.hidden = !job.result_digest;
  if (job.result_digest !== resultBox.dataset.digest) {
    resultBox.dataset.digest = job.result_digest;
    if (job.result_digest) refreshPart("result", details.dataset.resultUrl);
  }
  const seen = `${job.status} ${job.tries}`; // a try ended: its status or its count changed
  if (seen !== details.dataset.seen) {
    details.dataset.seen = seen;
    refreshPart("tries-list", details.dataset.triesUrl);
  }
  setText("error", job.error);
  document.getElementById("error-box").hidden = !job.error;
  document.getElementById("progress-box").hidden = !job.progress;
  if (job.progress) {
    const bar = document.getElementById("progress");
    bar.max = job.progress.total || 1;
    bar.value = job.progress.done;
    setText("progress-text", job.progress.text);
  }
  const download = document.getElementById("download");
  download.href = job.download || "";
  document.getElementById("download-box").hidden = !job.download;
  document.getElementById("abort-form").hidden = job.finished;
}

function followJob(details) {
  const events = new EventSource(details.dataset.eventsUrl);
  events.onmessage = (event) => showJob(details, JSON.parse(event.data));
  events.addEventListener("end", () => events.close()); // finished: nothing more will change
}

// A part of a page (the overview) that refreshes itself: the page is fetched again and the
// part of the same id swapped in when it changed.
const SELF_REFRESH_MS = 3000;

function refreshSelf(part) {
  let busy = false;
  setInterval(async () => {
    if (busy) return;
    busy = true;
    try {
      const response = await fetch(window.location.href, { credentials: "same-origin" });
      if (response.redirected) {
        window.location.assign(response.url); // the session ended: to the login page
      } else if (response.ok) {
        const page = new DOMParser().parseFromString(await response.text(), "text/html");
        const fresh = page.getElementById(part.id);
        if (fresh && fresh.innerHTML !== part.dataset.last) {
          part.dataset.last = fresh.innerHTML;
          part.innerHTML = fresh.innerHTML;
          localTimes(part);
        }
      }
    } catch (error) {
      // the server is restarting or the network blinked: the next tick tries again
    } finally {
      busy = false;
    }
  }, SELF_REFRESH_MS);
}

localTimes(document);
for (const part of document.querySelectorAll("[data-refresh-self]")) refreshSelf(part);
const jobsTable = document.getElementById("jobs");
// an older page is a snapshot: only the newest one follows new jobs
if (jobsTable && !("static" in jobsTable.dataset)) refreshRows(jobsTable);
const jobDetails = document.getElementById("job");
if (jobDetails) followJob(jobDetails);

// -- bulk actions (app/dashboard/bulk.py) --
// A header checkbox with data-select-all="<name>" ticks every checkbox of that name; a form
// with data-confirm runs only once the operator says yes to its question.
for (const all of document.querySelectorAll("input[data-select-all]")) {
  all.addEventListener("change", () => {
    const boxes = document.querySelectorAll(`input[type="checkbox"][name="${all.dataset.selectAll}"]`);
    for (const box of boxes) box.checked = all.checked;
  });
}
document.addEventListener("submit", (event) => {
  const question = event.target.dataset.confirm;
  if (question && !window.confirm(question)) event.preventDefault();
});

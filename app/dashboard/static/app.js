// The live parts of the dashboard, without a page reload: the jobs table re-fetches its rows
// every second, and a job page follows the job's Server-Sent Events. The rows come from the
// server already escaped; everything else is set with textContent, never as HTML.
"use strict";

const REFRESH_MS = 1000;

function refreshRows(table) {
  const body = table.tBodies[0];
  const url = table.dataset.rowsUrl + window.location.search; // the page's filters
  let busy = false;
  setInterval(async () => {
    if (busy) return; // a slow answer: skip a tick rather than pile requests up
    busy = true;
    try {
      const response = await fetch(url, { credentials: "same-origin" });
      if (response.redirected) {
        window.location.assign(response.url); // the session ended: to the login page
      } else if (response.ok) {
        const rows = await response.text();
        if (rows !== body.innerHTML) body.innerHTML = rows;
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

function showJob(job) {
  const status = document.getElementById("status");
  status.textContent = job.status;
  status.className = "badge " + job.status;
  const fields = ["function", "tries", "enqueue_time", "start_time", "finish_time", "next_try_at", "due_at", "callback"];
  for (const field of fields) {
    setText(field, job[field]);
  }
  setText("result", job.result);
  document.getElementById("result-box").hidden = !job.result;
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
  events.onmessage = (event) => showJob(JSON.parse(event.data));
  events.addEventListener("end", () => events.close()); // finished: nothing more will change
}

const jobsTable = document.getElementById("jobs");
if (jobsTable) refreshRows(jobsTable);
const jobDetails = document.getElementById("job");
if (jobDetails) followJob(jobDetails);

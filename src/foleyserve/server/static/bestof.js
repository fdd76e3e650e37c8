// Best of N on the page: a best_of job's samples in rank order, each with its scores.

// The job's results (one per seed) in the order to list them, each with its index among the
// results (seeds are typed text plus that offset) and its candidate's scores when ranked.
export function orderedResults(job) {
  const results = Array.isArray(job.results) ? job.results : [];
  const listed = results.map((result, k) => ({ result, k, candidate: null }));
  const candidates = Array.isArray(job.candidates) ? job.candidates : [];
  if (!candidates.length) return listed;
  const bySeed = new Map(candidates.map((c) => [String(c.seed), c]));
  for (const item of listed) item.candidate = bySeed.get(String(item.result.seed)) || null;
  // Unranked ones (none expected) go last, in seed order.
  const rank = (item) => (item.candidate ? item.candidate.rank : Infinity);
  return listed.sort((a, b) => rank(a) - rank(b) || a.k - b.k);
}

// "DeSync 0.12 s · CLAP 0.314": null DeSync (under 4.8 s, text to audio) is left out, not shown as 0.
export function scoreText(candidate) {
  if (!candidate) return "";
  const parts = [];
  if (typeof candidate.desync === "number") parts.push(`DeSync ${candidate.desync.toFixed(2)}\u00a0s`);
  if (typeof candidate.clap === "number") parts.push(`CLAP ${candidate.clap.toFixed(3)}`);
  return parts.join(" \u00b7 ");
}

// The scores cell of one listed sample, with the "best" mark on the kept one.
export function scoreCell(candidate) {
  const cell = document.createElement("span");
  cell.className = "sample-scores";
  cell.dataset.testid = "sample-scores";
  if (!candidate) return cell;
  if (candidate.kept) {
    const badge = document.createElement("strong");
    badge.className = "badge best";
    badge.dataset.testid = "sample-best";
    badge.textContent = "best";
    cell.append(badge, " ");
  }
  cell.append(scoreText(candidate));
  return cell;
}

export function rankedByText(job) {
  const by = Array.isArray(job.ranked_by) ? job.ranked_by : [];
  const names = { desync: "DeSync (lower is better)", clap: "CLAP (higher is better)" };
  return by.map((m) => names[m] || m).join(", then ");
}

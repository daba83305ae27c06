// Reads a streamed NDJSON body record by record.
//
// Network chunks do not respect line boundaries (nor UTF-8 character boundaries), so bytes are decoded
// in streaming mode and a partial last line is kept until the rest of it arrives. Blank lines are the
// relay's keep-alives during upstream silence and carry nothing.
export async function* readNdjson(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let pending = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pending += decoder.decode(value, { stream: true });
      let newline = pending.indexOf('\n');
      while (newline >= 0) {
        const line = pending.slice(0, newline);
        pending = pending.slice(newline + 1);
        if (line.trim() !== '') yield parseRecord(line);
        newline = pending.indexOf('\n');
      }
    }
    pending += decoder.decode();
    if (pending.trim() !== '') yield parseRecord(pending);
  } finally {
    // Ends the download when the consumer stops early (or after an abort, where it is a no-op).
    reader.cancel().catch(() => undefined);
  }
}

export class UnreadableRecordError extends Error {}

function parseRecord(line) {
  try {
    return JSON.parse(line);
  } catch {
    throw new UnreadableRecordError(`The relay sent a line this page cannot read: ${line.slice(0, 80)}`);
  }
}

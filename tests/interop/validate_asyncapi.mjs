// Validates schemas/asyncapi.json with the real AsyncAPI parser (@asyncapi/parser).
// Usage: node validate_asyncapi.mjs [path]; exits 1 and prints the diagnostics on an error.
import { readFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import path from "node:path";
import { Parser } from "@asyncapi/parser";

const here = path.dirname(fileURLToPath(import.meta.url));
const file = process.argv[2] ?? path.join(here, "..", "..", "schemas", "asyncapi.json");
const parser = new Parser();
const { document, diagnostics } = await parser.parse(await readFile(file, "utf8"), { source: file });
// Severity 0 is an error; warnings (1) and hints are printed but do not fail.
const errors = diagnostics.filter((d) => d.severity === 0);
for (const d of diagnostics) {
  console.log(`${["error", "warning", "info", "hint"][d.severity]} ${d.code} at ${d.path.join(".")}: ${d.message}`);
}
if (!document || errors.length) {
  console.log(`${file}: INVALID (${errors.length} errors)`);
  process.exit(1);
}
const channels = document.channels().length;
const operations = document.operations().length;
const messages = document.components().messages().length;
console.log(`${file}: valid AsyncAPI ${document.version()} (${channels} channels, ${operations} operations, ${messages} messages)`);

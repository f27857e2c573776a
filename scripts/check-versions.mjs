// `make lint`: every workspace's package.json carries the version of CHANGELOG.md's top entry, and
// workspaces depend on exactly that version of each other.
import { readFileSync } from "node:fs";

const changelog = readFileSync("CHANGELOG.md", "utf8");
const top = changelog.match(/^## (\d+\.\d+\.\d+)\b/m)?.[1];
if (!top) {
  console.error("CHANGELOG.md: no '## X.Y.Z' entry");
  process.exit(1);
}
const root = JSON.parse(readFileSync("package.json", "utf8"));
const files = ["package.json", ...root.workspaces.map((w) => `${w}/package.json`)];
const names = new Set(files.map((f) => JSON.parse(readFileSync(f, "utf8")).name));
const problems = [];
for (const f of files) {
  const pkg = JSON.parse(readFileSync(f, "utf8"));
  if (pkg.version !== top) problems.push(`${f}: version ${pkg.version}, CHANGELOG.md's top entry is ${top}`);
  for (const [dep, spec] of Object.entries({ ...pkg.dependencies, ...pkg.devDependencies })) {
    if (names.has(dep) && spec !== top) problems.push(`${f}: depends on ${dep}@${spec}, expected ${top}`);
  }
}
for (const p of problems) console.error(p);
process.exit(problems.length > 0 ? 1 : 0);

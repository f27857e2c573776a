// Where the tests find ../shared/data (PKV_SHARED_DATA overrides), never copied into the repo.
import { resolve } from "node:path";

import { repoRoot } from "../src/engine/engine-path.js";

export const DATA_DIR = process.env.PKV_SHARED_DATA ?? resolve(repoRoot(), "..", "shared", "data");
export const ESSAYS = resolve(DATA_DIR, "haystack", "paul_graham_essays");

"""The peer of bench/data_bench.py: datatrove 0.10.1 doing the same work as our `data` stage
(Gopher repetition + quality filters, C4 filter, MinHash dedup with the same 16 bands x 7
rows over 5-word shingles), with the same number of worker processes, as its docs show.

Runs only in its own environment (datatrove's MinHash needs xxhash<4; ours uses xxhash 4):
    python3 -m venv bench/.venv-datatrove
    bench/.venv-datatrove/bin/pip install "datatrove[processing]==0.10.1" "xxhash<4" spacy orjson
Usage: datatrove_peer.py CORPUS_DIR WORK_DIR WORKERS  (prints one JSON line)
"""

import json
import shutil
import sys
import time
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter
from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter


def main() -> None:
    corpus, work, workers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    shutil.rmtree(work, ignore_errors=True)
    config = MinhashConfig(n_grams=5, num_buckets=16, hashes_per_bucket=7)
    logs = work / "logs"
    start = time.perf_counter()

    def run(name, pipeline, tasks, **kwargs):
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=str(logs / name), **kwargs).run()

    run("filter", [
        JsonlReader(str(corpus), glob_pattern="*.jsonl"),
        GopherRepetitionFilter(),
        GopherQualityFilter(),
        C4QualityFilter(),
        JsonlWriter(str(work / "filtered")),
    ], workers)
    run("signatures", [
        JsonlReader(str(work / "filtered")),
        MinhashDedupSignature(output_folder=str(work / "signatures"), config=config),
    ], workers)
    run("buckets", [
        MinhashDedupBuckets(input_folder=str(work / "signatures"), output_folder=str(work / "buckets"), config=config),
    ], config.num_buckets)
    run("cluster", [
        MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove_ids"), config=config),
    ], 1)
    run("dedup", [
        JsonlReader(str(work / "filtered")),
        MinhashDedupFilter(input_folder=str(work / "remove_ids")),
        JsonlWriter(str(work / "deduplicated")),
    ], workers)
    wall = time.perf_counter() - start
    kept = sum(1 for f in (work / "deduplicated").rglob("*.jsonl.gz") for _ in __import__("gzip").open(f, "rt"))
    print(json.dumps({"wall_s": wall, "documents_out": kept}))


if __name__ == "__main__":
    main()

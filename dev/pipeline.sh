# shellcheck shell=bash
# Sourced by speedrun.sh, run1000.sh and dev/runcpu.sh: run the pipeline one stage at a time so
# that running the script again continues where a crashed or interrupted run stopped.
#
#   stage NAME COMMAND...   run COMMAND, logged to $RUN_DIR/NAME.log, unless an earlier run
#                           finished it; a failure stops the script, naming the stage
#   DRY_RUN=1               print each stage's command instead of running it
#
# Training stages get --resume=auto from the scripts that call them, so an unfinished one picks
# up from its last checkpoint. Delete $RUN_DIR to start over.

DRY_RUN="${DRY_RUN:-0}"

stage() {
    local name=$1
    shift
    if [ "$DRY_RUN" = 1 ]; then
        echo "== $name: $*"
        return
    fi
    if [ -e "$RUN_DIR/$name.done" ]; then
        echo "== $name: finished in an earlier run, skipped"
        return
    fi
    echo "== $name: $*"
    mkdir -p "$RUN_DIR"
    local start=$SECONDS
    if ! "$@" 2>&1 | tee "$RUN_DIR/$name.log"; then
        echo "stage '$name' failed (log: $RUN_DIR/$name.log); fix the cause and run the script again to continue" >&2
        exit 1
    fi
    echo "$((SECONDS - start))" > "$RUN_DIR/$name.done"  # the marker holds the stage's seconds
    echo "== $name: done in $((SECONDS - start)) s"
}

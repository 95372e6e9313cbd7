# Sourced by scripts/table*.sh: where a table's runs and report go.
#   table_dirs <table> ARGS...   sets SWEEP, OUT and ARGS (the arguments less --publish)
# An override that changes the recipe (any KEY=VALUE except launcher settings and result-neutral
# keys) sends the runs to outputs/sweeps/<table>-custom and the report to outputs/reports/<name>,
# never over the committed docs/results/<name>: unless --publish says these numbers are the table's.
table_dirs() {
    local table=$1 publish=0 custom=0 name
    shift
    ARGS=()
    for arg in "$@"; do
        if [[ $arg == --publish ]]; then publish=1; continue; fi
        ARGS+=("$arg")
        case $arg in
            hydra.launcher.*|hydra/launcher=*|trainer.quiet=*|trainer.num_workers=*|trainer.eval_batch_size=*) ;;
            trainer.device=*|trainer.eval_every=*|logger=*|logger.*) ;;
            *=*) custom=1 ;;
        esac
    done
    name=${table#table_}
    SWEEP=outputs/sweeps/$table OUT=docs/results/$name
    if ((custom && !publish)); then
        SWEEP=outputs/sweeps/$table-custom OUT=outputs/reports/$name
        echo "overrides change the recipe: runs go to $SWEEP and the report to $OUT" \
             "(pass --publish to make them docs/results/$name)" >&2
    fi
}

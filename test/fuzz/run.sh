#!/bin/sh
# test/fuzz/run.sh fuzz SECONDS DIR TARGET...   (make fuzz)
# test/fuzz/run.sh replay DIR TARGET...         (make fuzz-replay)
#
# fuzz: runs each target (DIR/TARGET, built by make) for SECONDS, one after the other, on
# a scratch copy of its committed corpus (test/fuzz/corpus/TARGET, in DIR/corpus-TARGET),
# so that the committed corpus does not grow; with its dictionary (test/fuzz/TARGET.dict)
# if it has one. A crash or a broken property leaves its input in DIR/TARGET-crash-*.
# replay: runs each target once over every input of its committed corpus.
# Either fails if any target fails, naming them.
set -u
mode=$1
shift
if [ "$mode" = fuzz ]; then
	seconds=$1
	shift
fi
dir=$1
shift
here=$(dirname "$0")
failed=""
for t in "$@"; do
	dict=""
	log="$dir/$t-$mode.log"
	[ -f "$here/$t.dict" ] && dict="-dict=$here/$t.dict"
	if [ "$mode" = fuzz ]; then
		rm -rf "$dir/corpus-$t"
		mkdir -p "$dir/corpus-$t"
		cp "$here/corpus/$t/"* "$dir/corpus-$t/"
		echo "fuzz $t: $seconds s"
		# shellcheck disable=SC2086
		"$dir/$t" -max_total_time="$seconds" -print_final_stats=1 $dict \
			-artifact_prefix="$dir/$t-" "$dir/corpus-$t" >"$log" 2>&1
		status=$?
		grep -E '^#[0-9]+[[:space:]]+DONE|stat::(number_of_executed_units|average_exec_per_sec)' "$log"
	else
		"$dir/$t" -runs=1 "$here/corpus/$t/"* >"$log" 2>&1
		status=$?
		echo "fuzz-replay $t: $(ls "$here/corpus/$t" | wc -l) inputs, $([ $status = 0 ] && echo ok || echo FAILED)"
	fi
	if [ $status != 0 ]; then
		why=$(grep -E 'property broken|runtime error|ERROR: [A-Za-z]+Sanitizer|ERROR: libFuzzer' "$log" | head -n 1)
		input=$(grep -E '^Running: |Test unit written to ' "$log" | tail -n 1 | sed 's/.* //')
		echo "  $t: $why (input: $input)"
		failed="$failed $t"
	fi
done
if [ -n "$failed" ]; then
	echo "chatroom: fuzz target(s) failed:$failed (logs in $dir/)"
	exit 1
fi

#!/bin/sh
# Runs the whole suite (both builds, as make test-all does) ROUNDS times in a row with two
# busy loops beside it, one per core of the 2-core development machine: the timing bounds
# of the tests must hold on a machine that is that loaded. Stops at the first failing round.
#
#   test/loaded.sh [ROUNDS]      (default 5; a round takes 10 to 20 minutes)
ROUNDS=${1:-5}
cd "$(dirname "$0")/.." || exit 1
make -s chatroom build/chatroom-asan build/protocol-server build/protocol-server-asan || exit 1

busy() { while :; do :; done; }
busy & b1=$!
busy & b2=$!
trap 'kill $b1 $b2 2>/dev/null' EXIT INT TERM

round=1
while [ "$round" -le "$ROUNDS" ]; do
	start=$(date +%s)
	if make --no-print-directory test-all >"build/loaded-round$round.log" 2>&1; then
		echo "round $round of $ROUNDS: passed in $(( $(date +%s) - start )) s" \
		     "($(grep -Eo '[0-9]+ passed|# pass [0-9]+' "build/loaded-round$round.log" | tr '\n' ' '))"
	else
		echo "round $round of $ROUNDS: FAILED after $(( $(date +%s) - start )) s; see build/loaded-round$round.log"
		exit 1
	fi
	round=$((round + 1))
done
echo "all $ROUNDS rounds passed with two busy loops beside them"

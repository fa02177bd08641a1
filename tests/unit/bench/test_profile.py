"""bench.profile's split of py-spy samples by process kind and own-code line."""

from bench.profile import kind_of, split

BROKER = ('process 1:"python -m bench";process 2:"python -c import sys; from sqm.cli import '
          'main; sys.exit(main()) serve bench --endpoint ipc:///x";<module> (<string>:1);'
          'Broker._run_one (sqm/broker/loop.py:166);recv_rest (sqm/zmqfast.py:57)')
WORKER = ('process 1:"python -m bench";process 3:"python -c spawn_main";worker_host '
          '(bench/sqm_adapter.py:40);Execution.run (worker/execute.py:249);loads (cbor2.py:1)')
IMPORT = ('process 1:"python -m bench";process 4:"python -c spawn_main";sender_main '
          '(bench/sqm_adapter.py:90);_find_and_load (<frozen importlib._bootstrap>:1176)')


def test_kinds_and_deepest_own_line() -> None:
    assert kind_of(BROKER) == "broker"
    assert kind_of(WORKER) == "workers"
    assert kind_of('process 1:"python -m bench";main (bench/cli.py:1)') == "other"
    # the baseline's broker is told apart by its function (it runs in a spawned process)
    assert kind_of('process 1:"python -m bench";process 5:"python -c spawn_main";'
                   'broker_main (bench/baseline.py:98)') == "broker"
    totals, where = split([f"{BROKER} 7\n", f"{WORKER} 5\n", f"{WORKER} 2\n", f"{IMPORT} 9\n"])
    assert totals == {"broker": 7, "workers": 7}  # the import's 9 samples are start-up: left out
    assert where["broker"] == {"recv_rest (sqm/zmqfast.py:57)": 7}
    # a library frame (cbor2) is charged to the deepest line of our own code that called it
    assert where["workers"] == {"Execution.run (worker/execute.py:249)": 7}

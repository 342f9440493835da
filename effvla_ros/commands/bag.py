"""``effvla bag``: rosbag2 utilities that need neither rosbag2 nor ``ros2 bag``.

Examples::

    effvla bag repair runs/pick_01                  # -> runs/pick_01_repaired (the source is not touched)
    effvla bag repair runs/pick_01/pick_01.mcap --out runs/pick_01_fixed
    effvla bag info runs/pick_01

``repair`` rewrites a recording that was interrupted (SIGKILL, power loss: an MCAP without summary and
footer, a metadata.yaml that lags behind) into a complete, indexed MCAP bag with a metadata.yaml that
``ros2 bag info/play``, rosbags and the ``mcap`` readers open: every complete message is kept with its
log time, topic, type, embedded definition, offered QoS and type hash.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    rp = sub.add_parser("repair", help="rewrite an interrupted recording into a complete, indexed MCAP bag")
    rp.add_argument("bag", help="rosbag2 directory or its .mcap file")
    rp.add_argument("--out", "-o", default=None, help="output bag directory (must not exist; default "
                    "<bag>_repaired next to the bag)")
    ip = sub.add_parser("info", help="topics, types and message counts (also of an interrupted recording)")
    ip.add_argument("bag", help="rosbag2 directory or its .mcap/.db3 file")


def run(args: argparse.Namespace) -> int:
    from effvla_ros.replay.bagio import open_bag, repair_bag

    if args.action == "repair":
        res = repair_bag(args.bag, args.out)
        state = f"interrupted ({res.reason})" if res.reason else "complete already"
        print(f"repaired {res.source} -> {res.out}: {res.messages} messages on {len(res.topics)} topics; "
              f"the source was {state}")
        for topic, n in sorted(res.topics.items()):
            print(f"  {topic}: {n}")
        return 0
    bag = open_bag(args.bag)
    print(f"{bag.path}: {bag.storage}, {bag.message_count} messages"
          + (" (interrupted recording: run `effvla bag repair`)" if bag.recovered else ""))
    for name, info in sorted(bag.topics.items()):
        print(f"  {name} [{info.msgtype}]: {info.count}")
    for note in bag.notes:
        print(f"  note: {note}")
    return 0

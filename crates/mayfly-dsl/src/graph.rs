//! A playbook as a drawable graph: steps, `next` arcs and a layered
//! layout, computed here so that every client (the web UI, the CLI) draws the same picture.
//!
//! Layout: a step's rank is its longest distance from `start` over forward arcs (arcs that
//! close a cycle are marked `back` and ignored for ranking); steps unreachable from `start`
//! go in one rank after the last. Within a rank, steps keep document order.

use crate::node::NodeV;
use crate::playbook::{ENTRY_STEP, LoopMode, NextMode, Playbook};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

/// A step as drawn.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GraphNode {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub desc: Option<String>,
    /// Tool kinds of the step's tasks, in order (empty: a pure routing step).
    pub tools: Vec<&'static str>,
    /// `sequential` or `parallel` when the step loops.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub looping: Option<&'static str>,
    /// `exclusive` (first matching arc) or `inclusive` (every matching arc).
    pub routing: &'static str,
    /// Column of the layout (0 = `start`).
    pub rank: usize,
    /// Row within the column.
    pub order: usize,
    /// Source line of the step.
    pub line: u32,
}

/// An arc between two steps.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GraphEdge {
    pub from: String,
    pub to: String,
    /// The arc's condition as written (None: always).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub when: Option<String>,
    /// True when the arc closes a cycle (drawn backwards).
    pub back: bool,
}

/// The whole graph: nodes in document order.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Graph {
    pub nodes: Vec<GraphNode>,
    pub edges: Vec<GraphEdge>,
    /// Number of ranks (columns).
    pub ranks: usize,
}

fn when_text(n: &crate::node::Node) -> String {
    match &n.v {
        NodeV::Str(s) => s.clone(),
        NodeV::Bool(b) => b.to_string(),
        NodeV::Int(i) => i.to_string(),
        NodeV::Float(f) => f.to_string(),
        NodeV::Null => "null".into(),
        NodeV::Seq(_) | NodeV::Map(_) => "…".into(),
    }
}

/// Draw `pb`.
pub fn graph(pb: &Playbook) -> Graph {
    let index: HashMap<&str, usize> = pb
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    let mut edges = Vec::new();
    for s in &pb.steps {
        for a in &s.next.arcs {
            edges.push(GraphEdge {
                from: s.name.clone(),
                to: a.step.clone(),
                when: a.when.as_ref().map(when_text),
                back: false,
            });
        }
    }
    // Arcs to unknown steps cannot be drawn (validation reports them; a parsed playbook
    // has none, but the graph must not panic on one that slipped through).
    edges.retain(|e| index.contains_key(e.from.as_str()) && index.contains_key(e.to.as_str()));
    let n = pb.steps.len();
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (k, e) in edges.iter().enumerate() {
        if let Some(&f) = index.get(e.from.as_str()) {
            out[f].push(k);
        }
    }
    // Back arcs: those reaching a step on the current DFS path (iterative, no recursion
    // depth limit for long chains).
    let mut state = vec![0u8; n]; // 0 new, 1 on path, 2 done
    let mut back = vec![false; edges.len()];
    let roots: Vec<usize> = index
        .get(ENTRY_STEP)
        .copied()
        .into_iter()
        .chain(0..n)
        .collect();
    for root in roots {
        if state[root] != 0 {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
        state[root] = 1;
        while let Some((v, i)) = stack.pop() {
            if let Some(&k) = out[v].get(i) {
                stack.push((v, i + 1));
                let w = index[edges[k].to.as_str()];
                match state[w] {
                    0 => {
                        state[w] = 1;
                        stack.push((w, 0));
                    }
                    1 => back[k] = true,
                    _ => {}
                }
            } else {
                state[v] = 2;
            }
        }
    }
    for (e, b) in edges.iter_mut().zip(&back) {
        e.back = *b;
    }
    // Longest path from start over forward arcs (a DAG now): relax in topological order.
    let mut indeg = vec![0usize; n];
    for e in edges.iter().filter(|e| !e.back) {
        indeg[index[e.to.as_str()]] += 1;
    }
    let mut rank: Vec<Option<usize>> = vec![None; n];
    if let Some(&s) = index.get(ENTRY_STEP) {
        rank[s] = Some(0);
    }
    let mut ready: Vec<usize> = (0..n).filter(|&v| indeg[v] == 0).rev().collect();
    while let Some(v) = ready.pop() {
        for &k in &out[v] {
            if edges[k].back {
                continue;
            }
            let w = index[edges[k].to.as_str()];
            if let Some(r) = rank[v] {
                rank[w] = Some(rank[w].map_or(r + 1, |x| x.max(r + 1)));
            }
            indeg[w] -= 1;
            if indeg[w] == 0 {
                ready.push(w);
            }
        }
    }
    let reached = rank.iter().flatten().max().map_or(0, |m| m + 1);
    let unreached = rank.iter().any(Option::is_none);
    let ranks = reached + usize::from(unreached);
    let mut rows: BTreeMap<usize, usize> = BTreeMap::new();
    let nodes = pb
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let r = rank[i].unwrap_or(reached);
            let row = rows.entry(r).or_insert(0);
            let order = *row;
            *row += 1;
            GraphNode {
                name: s.name.clone(),
                desc: s.desc.clone(),
                tools: s.tasks.iter().map(|t| t.kind.as_str()).collect(),
                looping: s.looping.as_ref().map(|l| match l.mode {
                    LoopMode::Sequential => "sequential",
                    LoopMode::Parallel => "parallel",
                }),
                routing: match s.next.mode {
                    NextMode::Exclusive => "exclusive",
                    NextMode::Inclusive => "inclusive",
                },
                rank: r,
                order,
                line: s.loc.line,
            }
        })
        .collect();
    Graph {
        nodes,
        edges,
        ranks,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ParseOptions, parse};

    fn g(src: &str) -> Graph {
        graph(&parse("t.yaml", src, &ParseOptions::default()).expect("parses"))
    }

    fn node<'a>(g: &'a Graph, name: &str) -> &'a GraphNode {
        g.nodes.iter().find(|n| n.name == name).expect("node")
    }

    const HEAD: &str =
        "apiVersion: noetl.io/v2\nkind: Playbook\nmetadata: {name: t, path: t}\nworkload: {x: 1}\n";

    #[test]
    fn a_chain_is_one_step_per_rank() {
        let g = g(&format!(
            "{HEAD}workflow:\n  - step: start\n    next: {{arcs: [{{step: a}}]}}\n  - step: a\n    tool: {{kind: python, code: 'result = 1'}}\n    next: {{arcs: [{{step: end}}]}}\n  - step: end\n"
        ));
        assert_eq!(g.ranks, 3);
        let ranks: Vec<(String, usize, usize)> = g
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.rank, n.order))
            .collect();
        assert_eq!(
            ranks,
            vec![
                ("start".into(), 0, 0),
                ("a".into(), 1, 0),
                ("end".into(), 2, 0)
            ]
        );
        assert_eq!(node(&g, "a").tools, vec!["python"]);
        assert!(node(&g, "start").tools.is_empty());
        assert!(g.edges.iter().all(|e| !e.back));
    }

    #[test]
    fn branches_share_a_rank_and_a_join_waits_for_the_longest_path() {
        let g = g(&format!(
            "{HEAD}workflow:\n  - step: start\n    next:\n      spec: {{mode: inclusive}}\n      arcs:\n        - step: a\n          when: \"{{{{ x > 1 }}}}\"\n        - step: b\n  - step: a\n    next: {{arcs: [{{step: c}}]}}\n  - step: b\n    next: {{arcs: [{{step: join}}]}}\n  - step: c\n    next: {{arcs: [{{step: join}}]}}\n  - step: join\n",
        ));
        assert_eq!(node(&g, "a").rank, 1);
        assert_eq!((node(&g, "b").rank, node(&g, "b").order), (1, 1));
        assert_eq!(node(&g, "c").rank, 2);
        // join is reached by start→b→join (2) and start→a→c→join (3): the longer wins.
        assert_eq!(node(&g, "join").rank, 3);
        assert_eq!(node(&g, "start").routing, "inclusive");
        let cond = g.edges.iter().find(|e| e.to == "a").expect("arc");
        assert_eq!(cond.when.as_deref(), Some("{{ x > 1 }}"));
    }

    #[test]
    fn a_cycle_is_drawn_with_one_back_arc_and_still_ranks() {
        let g = g(&format!(
            "{HEAD}workflow:\n  - step: start\n    next: {{arcs: [{{step: poll}}]}}\n  - step: poll\n    tool: {{kind: python, code: 'result = 1'}}\n    next:\n      arcs:\n        - step: poll\n          when: \"{{{{ poll == 1 }}}}\"\n        - step: end\n  - step: end\n"
        ));
        let back: Vec<_> = g.edges.iter().filter(|e| e.back).collect();
        assert_eq!(back.len(), 1);
        assert_eq!(
            (back[0].from.as_str(), back[0].to.as_str()),
            ("poll", "poll")
        );
        assert_eq!(node(&g, "end").rank, 2);
    }

    #[test]
    fn loops_and_unreachable_steps() {
        let g = g(&format!(
            "{HEAD}workflow:\n  - step: start\n    loop: {{in: [1, 2], iterator: i, spec: {{mode: parallel}}}}\n    tool: {{kind: python, code: 'result = i'}}\n    next: {{arcs: [{{step: end}}]}}\n  - step: end\n  - step: orphan\n"
        ));
        assert_eq!(node(&g, "start").looping, Some("parallel"));
        assert_eq!(node(&g, "end").looping, None);
        assert_eq!(node(&g, "end").rank, 1);
        // Unreachable: one column after the last reached one.
        assert_eq!(node(&g, "orphan").rank, 2);
        assert_eq!(g.ranks, 3);
    }

    #[test]
    fn a_long_chain_needs_no_recursion() {
        let mut src = format!("{HEAD}workflow:\n");
        for i in 0..3000 {
            let name = if i == 0 {
                "start".to_owned()
            } else {
                format!("s{i}")
            };
            src.push_str(&format!(
                "  - step: {name}\n    next: {{arcs: [{{step: s{}}}]}}\n",
                i + 1
            ));
        }
        src.push_str("  - step: s3000\n");
        let g = g(&src);
        assert_eq!(g.ranks, 3001);
        assert_eq!(node(&g, "s3000").rank, 3000);
    }
}
